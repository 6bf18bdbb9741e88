"""return_stats=True: the counts, weights and normaliser a call used, against the formulas written
out with torch.bincount, for the kernel path and the reference path; the loss is unchanged by the
request; stats need no host sync (they compile with fullgraph=True) and carry no gradient."""

import pytest
import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import BatchWeighting, functional

SCHEMES = {
    None: lambda n: torch.ones_like(n),
    "inverse": lambda n: 1.0 / (n + 1.0),
    "inverse_sqrt": lambda n: 1.0 / torch.sqrt(n + 1.0),
    "effective_number": lambda n: (1 - 0.999) / (1 - 0.999 ** torch.clamp(n, min=1.0)),
}


@pytest.fixture(params=["extension", "reference"])
def path(request, monkeypatch):
    """The kernel path (where the extension serves the CPU) and the reference path."""
    if request.param == "extension":
        if fused_wloss.backend("cpu") != "extension":
            pytest.skip("the compiled extension is not loaded")
    else:
        monkeypatch.setattr(functional, "use_extension", lambda device: False)
    return request.param


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ce_case(shape, num_classes, seed, ignore=True):
    gen = _gen(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    loss_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    p = torch.tensor([2.0 ** -c for c in range(num_classes)])
    y = torch.multinomial(p, max(1, torch.Size(loss_shape).numel()), replacement=True, generator=gen)
    y = y.reshape(loss_shape)
    if ignore and y.dim() > 0:
        y.view(-1)[::5] = -100
    return x, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sample_mean"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("static,use_sw", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("shape", [(40, 6), (8, 6, 3, 2), (6,)], ids=["2d", "kdim", "unbatched"])
def test_cross_entropy_stats_match_formulas(path, reduction, scheme, static, use_sw, shape):
    num_classes = 6
    x, y = _ce_case(shape, num_classes, seed=1)
    gen = _gen(2)
    weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5 if static else None
    sw = torch.rand(y.shape, generator=gen, dtype=torch.float64) + 0.5 if use_sw else None
    kwargs = dict(weight=weight, reduction=reduction, sample_weight=sw, class_weighting=scheme, label_smoothing=0.1)

    loss, stats = fused_wloss.cross_entropy(x, y, return_stats=True, **kwargs)

    # the formulas, written out
    valid = y != -100
    counts = torch.bincount(y[valid].flatten(), minlength=num_classes).double()
    class_weight = SCHEMES[scheme](counts) * (weight if static else 1.0)
    s = sw if use_sw else torch.ones(y.shape, dtype=torch.float64)
    norm = {
        "mean": (s * valid * class_weight[torch.where(valid, y, 0)]).sum(),
        "sample_mean": valid.sum().double(),
        "sum": torch.tensor(1.0, dtype=torch.float64),
        "none": torch.tensor(1.0, dtype=torch.float64),
    }[reduction]
    torch.testing.assert_close(stats.counts, counts)
    torch.testing.assert_close(stats.class_weight, class_weight)
    torch.testing.assert_close(stats.normalizer, norm)
    # the loss is the one the call gives without stats, and the reference's
    torch.testing.assert_close(loss, fused_wloss.cross_entropy(x, y, **kwargs), rtol=0, atol=0)
    torch.testing.assert_close(loss, fused_wloss.reference.cross_entropy(x, y, **kwargs))
    # and it is the "sum" divided by the normaliser
    if reduction in ("mean", "sample_mean"):
        total = fused_wloss.cross_entropy(x, y, **{**kwargs, "reduction": "sum"})
        torch.testing.assert_close(loss, total / stats.normalizer)


@pytest.mark.parametrize("reduction", ["mean", "sample_mean", "sum"])
def test_cross_entropy_stats_probability_target(reduction):
    gen = _gen(3)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(20, 5, generator=gen, dtype=torch.float64), dim=1)
    sw = torch.rand(20, generator=gen, dtype=torch.float64)
    loss, stats = fused_wloss.cross_entropy(
        x, q, reduction=reduction, sample_weight=sw, class_weighting="inverse", return_stats=True
    )
    torch.testing.assert_close(stats.counts, q.sum(0))
    torch.testing.assert_close(stats.class_weight, 1.0 / (q.sum(0) + 1.0))
    want_norm = {"mean": sw.sum(), "sample_mean": torch.tensor(20.0, dtype=torch.float64),
                 "sum": torch.tensor(1.0, dtype=torch.float64)}[reduction]
    torch.testing.assert_close(stats.normalizer, want_norm)
    torch.testing.assert_close(
        loss, fused_wloss.reference.cross_entropy(x, q, reduction=reduction, sample_weight=sw, class_weighting="inverse")
    )


@pytest.mark.parametrize("scheme", [None, "inverse", "balanced", BatchWeighting("inverse_sqrt", balanced=True)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(30, 4), (5, 6, 3), (25,), ()], ids=["2d", "3d", "1d", "0d"])
def test_bce_stats_match_formulas(path, scheme, reduction, shape):
    gen = _gen(4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = (torch.rand(shape, generator=gen) < 0.3).double()
    pos_weight = torch.rand(shape[-1:] if len(shape) >= 2 else (), generator=gen, dtype=torch.float64) + 1.0
    kwargs = dict(reduction=reduction, class_weighting=scheme, pos_weight=pos_weight)

    loss, stats = fused_wloss.binary_cross_entropy_with_logits(x, t, return_stats=True, **kwargs)

    rows = t.reshape(-1, shape[-1]) if len(shape) >= 2 else t.reshape(-1, 1)
    pos, neg = rows.sum(0), (1.0 - rows).sum(0)
    spec = fused_wloss._weighting.resolve_class_weighting(scheme, loss="bce")
    formula = SCHEMES[None if spec is None else spec.scheme]
    pos_w = formula(pos)
    neg_w = formula(neg) if spec is not None and spec.balanced else pos_w
    torch.testing.assert_close(stats.pos_counts, pos)
    torch.testing.assert_close(stats.neg_counts, neg)
    torch.testing.assert_close(stats.pos_weight, pos_w)
    torch.testing.assert_close(stats.neg_weight, neg_w)
    want_norm = float(max(x.numel(), 1)) if reduction == "mean" else 1.0
    torch.testing.assert_close(stats.normalizer, torch.tensor(want_norm, dtype=torch.float64))
    torch.testing.assert_close(loss, fused_wloss.binary_cross_entropy_with_logits(x, t, **kwargs), rtol=0, atol=0)
    # the per-element loss written out with the stats' weights
    a = neg_w if x.dim() >= 1 else neg_w.reshape(())
    b = (pos_w if x.dim() >= 1 else pos_w.reshape(())) * pos_weight
    elems = a * (1 - t) * F.softplus(x) + b * t * F.softplus(-x)
    want = {"none": elems, "sum": elems.sum(), "mean": elems.sum() / stats.normalizer}[reduction]
    torch.testing.assert_close(loss, want)


def test_stats_dtype_device_and_no_gradient():
    x = torch.randn(16, 5, requires_grad=True)
    y = torch.randint(0, 5, (16,), generator=_gen(5))
    weight = torch.rand(5, requires_grad=True)  # goes to the reference, which keeps weight's graph
    for kwargs in ({}, {"weight": weight}):
        loss, stats = fused_wloss.cross_entropy(x, y, class_weighting="inverse", return_stats=True, **kwargs)
        for field in stats:
            assert field.dtype == torch.float32 and field.device == x.device and not field.requires_grad
        loss.backward()
    _, stats64 = fused_wloss.cross_entropy(x.detach().double(), y, return_stats=True)
    assert all(f.dtype == torch.float64 for f in stats64)
    _, bstats = fused_wloss.binary_cross_entropy_with_logits(x, torch.rand(16, 5), return_stats=True)
    assert all(f.dtype == torch.float32 and not f.requires_grad for f in bstats)


def test_stats_of_degenerate_batches():
    x, y = torch.randn(0, 4), torch.zeros(0, dtype=torch.long)
    loss, stats = fused_wloss.cross_entropy(x, y, class_weighting="inverse", return_stats=True)
    assert torch.isnan(loss)
    torch.testing.assert_close(stats.counts, torch.zeros(4))
    torch.testing.assert_close(stats.class_weight, torch.ones(4))  # 1 / (0 + 1)
    torch.testing.assert_close(stats.normalizer, torch.tensor(0.0))
    x, y = torch.randn(3, 4), torch.full((3,), -100)
    loss, stats = fused_wloss.cross_entropy(x, y, reduction="sample_mean", return_stats=True)
    assert torch.isnan(loss) and stats.normalizer == 0


def test_to_dict_for_logging():
    x, y = torch.randn(10, 3), torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, -100])
    _, stats = fused_wloss.cross_entropy(x, y, class_weighting="inverse", return_stats=True)
    logged = stats.to_dict("train/")
    assert set(logged) == {f"train/{k}/{c}" for k in ("count", "weight") for c in range(3)} | {"train/normalizer"}
    assert logged["train/count/1"] == 3 and logged["train/weight/1"] == pytest.approx(0.25)
    assert all(v.dim() == 0 for v in logged.values())
    assert set(stats.to_dict(classes=[2])) == {"count/2", "weight/2", "normalizer"}
    _, bstats = fused_wloss.binary_cross_entropy_with_logits(
        torch.randn(6, 2), torch.tensor([[1.0, 0.0]] * 6), class_weighting="balanced", return_stats=True
    )
    logged = bstats.to_dict()
    assert logged["pos_count/0"] == 6 and logged["neg_count/0"] == 0 and logged["neg_count/1"] == 6
    assert logged["pos_weight/0"] == pytest.approx(1 / 7) and logged["neg_weight/0"] == pytest.approx(1.0)


def test_modules_return_stats():
    x, y = torch.randn(12, 4), torch.randint(0, 4, (12,), generator=_gen(6))
    criterion = fused_wloss.CrossEntropyLoss(class_weighting="inverse", reduction="sample_mean")
    loss, stats = criterion(x, y, return_stats=True)
    torch.testing.assert_close(loss, criterion(x, y))
    torch.testing.assert_close(stats.counts, torch.bincount(y, minlength=4).float())
    t = (torch.rand(12, 4, generator=_gen(7)) < 0.5).float()
    bce = fused_wloss.BCEWithLogitsLoss(class_weighting="balanced")
    loss, bstats = bce(x, t, return_stats=True)
    torch.testing.assert_close(loss, bce(x, t))
    torch.testing.assert_close(bstats.pos_counts, t.sum(0))


@pytest.mark.parametrize("loss_name", ["ce", "bce"])
def test_stats_compile_fullgraph(loss_name):
    """Requesting stats adds no graph break (so no host sync) and gives eager's values."""
    gen = _gen(8)
    x = torch.randn(32, 5, generator=gen)
    if loss_name == "ce":
        y = torch.randint(0, 5, (32,), generator=gen)
        y[:3] = -100

        def fn(x, y):
            return fused_wloss.cross_entropy(x, y, class_weighting="inverse", return_stats=True)
    else:
        y = (torch.rand(32, 5, generator=gen) < 0.2).float()

        def fn(x, y):
            return fused_wloss.binary_cross_entropy_with_logits(x, y, class_weighting="balanced", return_stats=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager_loss, eager_stats = fn(x1, y)
    got_loss, got_stats = compiled(x2, y)
    torch.testing.assert_close(got_loss, eager_loss)
    assert type(got_stats) is type(eager_stats)
    for got, want in zip(got_stats, eager_stats):
        torch.testing.assert_close(got, want)
    got_loss.backward()
    eager_loss.backward()
    torch.testing.assert_close(x2.grad, x1.grad)
