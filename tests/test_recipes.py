"""The seed recipes, written out literally as users write them today, each reproduced by one
fused_wloss call in value and gradient; plus the weighting schemes against their formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import BatchWeighting
from helpers import value_and_grad
from samples import Sample


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _imbalanced_targets(n, num_classes, gen):
    # class c drawn with probability proportional to 2^-c: the last classes are rare or absent
    p = torch.tensor([2.0 ** -c for c in range(num_classes)])
    return torch.multinomial(p, n, replacement=True, generator=gen)


@pytest.mark.parametrize("shape", [(64, 10), (16, 7, 5, 3)])
def test_recipe_1_inverse_counts_sample_mean(ce_impl, shape):
    gen = _gen(1)
    num_classes = shape[1]
    logits = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = _imbalanced_targets(logits.numel() // num_classes, num_classes, gen)
    y = y.reshape(shape[:1] + shape[2:])

    def seed_recipe(logits, y):
        counts = torch.bincount(y.flatten(), minlength=num_classes)
        w = 1.0 / (counts + 1.0)
        return (F.cross_entropy(logits, y, reduction="none") * w[y]).mean()

    sample = Sample("r1", (logits, y), {}, True)
    expected = value_and_grad(seed_recipe, sample)
    got = value_and_grad(
        lambda x, t: ce_impl(x, t, class_weighting="inverse", reduction="sample_mean"), sample
    )
    torch.testing.assert_close(got, expected)


def test_recipe_2_multilabel_inverse(bce_impl):
    gen = _gen(2)
    logits = torch.randn(128, 12, generator=gen, dtype=torch.float64)
    y = (torch.rand(128, 12, generator=gen) < torch.linspace(0.01, 0.6, 12)).long()

    def seed_recipe(logits, y):
        label_w = 1.0 / (y.sum(dim=0) + 1.0)
        return (F.binary_cross_entropy_with_logits(logits, y.double(), reduction="none") * label_w).mean()

    sample = Sample("r2", (logits, y), {}, True)
    expected = value_and_grad(seed_recipe, sample)
    got = value_and_grad(lambda x, t: bce_impl(x, t.double(), class_weighting="inverse"), sample)
    torch.testing.assert_close(got, expected)


def test_recipe_3_static_class_weights(ce_impl):
    gen = _gen(3)
    logits = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 6, (50,), generator=gen)
    class_weights = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0, 10.0], dtype=torch.float64)
    sample = Sample("r3", (logits, targets), {}, True)
    expected = value_and_grad(lambda x, t: F.cross_entropy(x, t, weight=class_weights), sample)
    got = value_and_grad(lambda x, t: ce_impl(x, t, weight=class_weights), sample)
    torch.testing.assert_close(got, expected)


def test_single_logit_binary_with_class_weights(bce_impl):
    """weights = [1, 10] for class 0 and class 1, in one call, against the loss written out."""
    gen = _gen(4)
    x = torch.randn(40, generator=gen, dtype=torch.float64)
    t = (torch.rand(40, generator=gen) < 0.2).double()
    w0, w1 = 1.0, 10.0
    p = torch.sigmoid(x)
    expected = (-(w1 * t * torch.log(p) + w0 * (1 - t) * torch.log1p(-p))).mean()
    got = bce_impl(x, t, weight=torch.tensor(w0, dtype=torch.float64),
                   pos_weight=torch.tensor(w1 / w0, dtype=torch.float64))
    torch.testing.assert_close(got, expected)


def _scheme_formula(scheme, n, smoothing=1.0, beta=0.999):
    if scheme == "inverse":
        return 1.0 / (n + smoothing)
    if scheme == "inverse_sqrt":
        return 1.0 / math.sqrt(n + smoothing)
    return (1.0 - beta) / (1.0 - beta ** max(n, 1.0))


@pytest.mark.parametrize("spec", [
    BatchWeighting("inverse"), BatchWeighting("inverse", smoothing=0.25),
    BatchWeighting("inverse_sqrt"), BatchWeighting("inverse_sqrt", smoothing=3.0),
    BatchWeighting("effective_number"), BatchWeighting("effective_number", beta=0.5),
    BatchWeighting("effective_number", beta=0.0),
], ids=repr)
def test_scheme_weights_match_formula(spec):
    counts = torch.tensor([0.0, 0.5, 1.0, 2.0, 7.0, 1000.0, 1e6], dtype=torch.float64)
    got = spec.weights(counts)
    expected = torch.tensor([_scheme_formula(spec.scheme, n, spec.smoothing, spec.beta) for n in counts.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("scheme", ["inverse", "inverse_sqrt", "effective_number"])
def test_dynamic_weights_with_absent_class_per_element(ce_impl, scheme):
    """The loss of every element is weighted by the formula of its class's count; classes 3 and 4
    are absent, the count of class 0 excludes the ignored targets."""
    gen = _gen(5)
    x = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2, -100, -100, 0, 2])
    counts = {0: 4, 1: 2, 2: 2, 3: 0, 4: 0}
    none = ce_impl(x, y, class_weighting=scheme, reduction="none")
    plain = F.cross_entropy(x, y, reduction="none")
    for i, c in enumerate(y.tolist()):
        w = 0.0 if c == -100 else _scheme_formula(scheme, counts[c])
        assert math.isclose(none[i].item(), w * plain[i].item(), rel_tol=1e-12, abs_tol=1e-15)
    mean = ce_impl(x, y, class_weighting=scheme)
    applied = sum(_scheme_formula(scheme, counts[c]) for c in y.tolist() if c != -100)
    assert math.isclose(mean.item(), none.sum().item() / applied, rel_tol=1e-12)
    sample_mean = ce_impl(x, y, class_weighting=scheme, reduction="sample_mean")
    assert math.isclose(sample_mean.item(), none.sum().item() / 8, rel_tol=1e-12)


def test_probability_target_counts_are_summed_probabilities(ce_impl):
    gen = _gen(6)
    x = torch.randn(6, 4, 3, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(6, 4, 3, generator=gen, dtype=torch.float64), dim=1)
    counts = q.sum(dim=(0, 2))
    w = 1.0 / (counts + 1.0)
    expected = F.cross_entropy(x, q, weight=w, reduction="sum")
    torch.testing.assert_close(ce_impl(x, q, class_weighting="inverse", reduction="sum"), expected)


def test_weights_multiply(ce_impl):
    gen = _gen(7)
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (20,), generator=gen)
    static = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64)
    sw = torch.rand(20, generator=gen, dtype=torch.float64)
    counts = torch.bincount(y, minlength=4).double()
    per_elem = static[y] * (1.0 / (counts + 1.0))[y] * sw
    expected = (F.cross_entropy(x, y, reduction="none") * per_elem).sum() / per_elem.sum()
    got = ce_impl(x, y, weight=static, sample_weight=sw, class_weighting="inverse")
    torch.testing.assert_close(got, expected)


def test_bce_balanced_per_label(bce_impl):
    gen = _gen(8)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    t = (torch.rand(30, 3, generator=gen) < torch.tensor([0.1, 0.5, 0.9])).double()
    n_pos, n_neg = t.sum(0), (1 - t).sum(0)
    expected = -(t * torch.log(torch.sigmoid(x)) / (n_pos + 1)
                 + (1 - t) * torch.log1p(-torch.sigmoid(x)) / (n_neg + 1)).mean()
    torch.testing.assert_close(bce_impl(x, t, class_weighting="balanced"), expected)
