"""Focal loss (``gamma``, and ``alpha`` for the sigmoid case) through every implementation: the CPU
kernels, the emulated CUDA kernels and the reference, against the formulas written out here
(torchvision's ``sigmoid_focal_loss`` for the sigmoid case, Lin et al. for softmax), combined with
every weighting, plus gradcheck and the argument checks."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import BatchWeighting, ops, reference

try:
    EMU = ops.load_emulation() if fused_wloss.backend("cpu") == "extension" else None
except ImportError:
    EMU = None

IMPLS = ["kernels", "reference"] + (["emulated-cuda"] if EMU else [])


def _call(impl, fn_name, *args, **kwargs):
    if impl == "reference":
        return getattr(reference, fn_name)(*args, **kwargs)
    ctx = ops.use_namespace(EMU) if impl == "emulated-cuda" else contextlib.nullcontext()
    with ctx:
        return getattr(fused_wloss, fn_name)(*args, **kwargs)


def _value_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (grad,) = torch.autograd.grad(out, x, g)
    return out.detach(), grad


# ---- sigmoid: torchvision's formula, written out -------------------------------------------------

def torchvision_sigmoid_focal_loss(x, t, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss, written out (alpha < 0 turns alpha off)."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gamma, alpha", [(2.0, 0.25), (2.0, None), (0.5, 0.75), (0.0, 0.25), (1.0, None)])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_matches_torchvision_formula(impl, gamma, alpha, soft, reduction):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 7, generator=gen, dtype=torch.float64) * 4
    t = torch.rand(40, 7, generator=gen, dtype=torch.float64)
    if not soft:
        t = (t < 0.3).double()
    ours = _value_and_grad(lambda x_: _call(impl, "binary_cross_entropy_with_logits", x_, t, reduction=reduction,
                                            gamma=gamma, alpha=alpha), x)
    theirs = _value_and_grad(lambda x_: torchvision_sigmoid_focal_loss(x_, t, -1 if alpha is None else alpha, gamma,
                                                                       reduction), x)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-9, atol=1e-12)


# ---- softmax: Lin et al., written out ---------------------------------------------------------

def literal_softmax_focal(x, t, gamma, weight=None, sample_weight=None, ignore_index=-100, reduction="mean"):
    nll = F.cross_entropy(x, t, reduction="none", ignore_index=ignore_index)
    p_t = torch.exp(-nll)
    valid = t != ignore_index
    w = torch.ones_like(nll) if weight is None else weight[torch.where(valid, t, 0)]
    w = torch.where(valid, w, torch.zeros_like(w))
    if sample_weight is not None:
        w = w * sample_weight
    loss = w * (1 - p_t) ** gamma * nll
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / w.sum(),
            "sample_mean": loss.sum() / valid.sum()}[reduction]


CE_CASES = {
    "rows": ((30, 45), {}),
    "tiled": ((50, 6), {"weight": True, "ignore": True}),
    "kdim": ((3, 5, 17), {"weight": True, "sample_weight": True}),
    "rows-all": ((20, 300), {"weight": True, "sample_weight": True, "ignore": True}),
}


def _ce_inputs(shape, opts, seed=2):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    tshape = shape[:1] + shape[2:]
    t = torch.randint(0, C, tshape, generator=gen)
    if opts.get("ignore"):
        t = torch.where(torch.rand(tshape, generator=gen) < 0.2, torch.full_like(t, -100), t)
    kw = {}
    if opts.get("weight"):
        kw["weight"] = torch.rand(C, generator=gen, dtype=torch.float64) + 0.2
    if opts.get("sample_weight"):
        kw["sample_weight"] = torch.rand(tshape, generator=gen, dtype=torch.float64) + 0.2
    return x, t, kw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sample_mean"])
def test_softmax_focal_matches_literal_formula(impl, gamma, case, reduction):
    shape, opts = CE_CASES[case]
    x, t, kw = _ce_inputs(shape, opts)
    ours = _value_and_grad(lambda x_: _call(impl, "cross_entropy", x_, t, reduction=reduction, gamma=gamma, **kw), x)
    theirs = _value_and_grad(lambda x_: literal_softmax_focal(x_, t, gamma, reduction=reduction, **kw), x)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
@pytest.mark.parametrize("scheme", ["inverse", BatchWeighting("effective_number", beta=0.99),
                                    BatchWeighting("inverse_sqrt", smoothing=0.5)], ids=str)
@pytest.mark.parametrize("case", list(CE_CASES))
def test_softmax_focal_with_dynamic_weights_matches_reference(impl, scheme, case):
    shape, opts = CE_CASES[case]
    x, t, kw = _ce_inputs(shape, opts, seed=3)
    ours = _value_and_grad(lambda x_: _call(impl, "cross_entropy", x_, t, gamma=1.5, class_weighting=scheme, **kw), x)
    ref = _value_and_grad(lambda x_: reference.cross_entropy(x_, t, gamma=1.5, class_weighting=scheme, **kw), x)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
@pytest.mark.parametrize("scheme", ["inverse", "balanced", BatchWeighting("effective_number", beta=0.9)], ids=str)
def test_sigmoid_focal_with_every_weight_matches_reference(impl, scheme):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 20, 6, generator=gen, dtype=torch.float64) * 3
    t = (torch.rand(3, 20, 6, generator=gen) < 0.25).double()
    kw = {"weight": torch.rand(6, generator=gen, dtype=torch.float64) + 0.3,
          "pos_weight": torch.rand(6, generator=gen, dtype=torch.float64) * 2 + 0.3,
          "sample_weight": torch.rand(3, 20, generator=gen, dtype=torch.float64) + 0.3,
          "class_weighting": scheme, "gamma": 2.0, "alpha": 0.25}
    ours = _value_and_grad(lambda x_: _call(impl, "binary_cross_entropy_with_logits", x_, t, **kw), x)
    ref = _value_and_grad(lambda x_: reference.binary_cross_entropy_with_logits(x_, t, **kw), x)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 33), (64, 7), (4, 7, 9)], ids=["flat-rows", "tiled", "kdim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
def test_low_precision_focal_close_to_float64(impl, dtype, shape):
    """Value and gradient, through the paths that take 16 rows at a time in low precision (the
    focal factor needs each row's p_t: those paths compute its coefficients row by row)."""
    x, t, kw = _ce_inputs(shape, {"weight": True, "ignore": True})
    xl = x.to(dtype).requires_grad_()
    ours = _call(impl, "cross_entropy", xl, t, gamma=2.0, weight=kw["weight"].to(dtype))
    (ours_grad,) = torch.autograd.grad(ours, xl)
    x64 = x.to(dtype).double().requires_grad_()
    exact = reference.cross_entropy(x64, t, gamma=2.0, weight=kw["weight"].to(dtype).double())
    (exact_grad,) = torch.autograd.grad(exact, x64)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ours.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(ours_grad.double(), exact_grad, rtol=tol, atol=tol * exact_grad.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(impl):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (6,), generator=gen)
    tb = (torch.rand(6, 5, generator=gen) < 0.4).double()
    assert torch.autograd.gradcheck(lambda x_: _call(impl, "cross_entropy", x_, t, gamma=1.5, class_weighting="inverse"), (x,))
    assert torch.autograd.gradcheck(
        lambda x_: _call(impl, "binary_cross_entropy_with_logits", x_, tb, gamma=2.0, alpha=0.3, pos_weight=torch.full((5,), 2.0, dtype=torch.float64)), (x,))


def test_gamma_zero_is_plain_loss():
    x, t, kw = _ce_inputs((30, 45), {"weight": True, "ignore": True})
    torch.testing.assert_close(fused_wloss.cross_entropy(x, t, gamma=0.0, **kw), F.cross_entropy(x, t, **kw))


def test_confident_predictions_have_finite_gradients():
    """p_t == 1 exactly in float: (1 - p_t)^(gamma - 1) is infinite for gamma < 1; the gradient is 0."""
    x = torch.tensor([[60.0, -60.0, -60.0], [-60.0, 60.0, -60.0]], dtype=torch.float64)
    t = torch.tensor([0, 1])
    tb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    for impl in IMPLS:
        _, g = _value_and_grad(lambda x_: _call(impl, "cross_entropy", x_, t, gamma=0.5), x)
        _, gb = _value_and_grad(lambda x_: _call(impl, "binary_cross_entropy_with_logits", x_, tb, gamma=0.5), x)
        assert torch.isfinite(g).all() and torch.isfinite(gb).all(), impl


def test_modules_and_compile():
    x, t, kw = _ce_inputs((16, 10), {"weight": True})
    module = fused_wloss.CrossEntropyLoss(weight=kw["weight"], gamma=2.0, class_weighting="inverse")
    assert "gamma=2.0" in repr(module)
    expected = reference.cross_entropy(x, t, weight=kw["weight"], gamma=2.0, class_weighting="inverse")
    torch.testing.assert_close(module(x, t), expected)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t), expected)
    tb = (torch.rand(16, 10) < 0.3).double()
    bce = fused_wloss.BCEWithLogitsLoss(gamma=2.0, alpha=0.25)
    torch.testing.assert_close(bce(x, tb), torchvision_sigmoid_focal_loss(x, tb, 0.25, 2.0, "mean"))


@pytest.mark.parametrize("call, match", [
    (lambda x, t, tb: fused_wloss.cross_entropy(x, t, gamma=-1.0), r"gamma .* must be a finite number >= 0, got -1.0"),
    (lambda x, t, tb: fused_wloss.cross_entropy(x, t, gamma=float("nan")), r"gamma .* got nan"),
    (lambda x, t, tb: fused_wloss.cross_entropy(x, t, gamma=2.0, label_smoothing=0.1), r"cannot be combined with label_smoothing=0.1"),
    (lambda x, t, tb: fused_wloss.cross_entropy(x, torch.softmax(x, 1), gamma=2.0), r"needs class-index targets"),
    (lambda x, t, tb: fused_wloss.binary_cross_entropy_with_logits(x, tb, alpha=1.5), r"alpha .* must be in \[0, 1\] or None, got 1.5"),
    (lambda x, t, tb: fused_wloss.binary_cross_entropy_with_logits(x, tb, gamma=-0.5), r"gamma .* got -0.5"),
    (lambda x, t, tb: fused_wloss.CrossEntropyLoss(gamma=-2.0), r"gamma"),
])
def test_bad_focal_arguments(call, match):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=match):
        call(x, torch.tensor([0, 1, 2, 0]), (torch.rand(4, 3) < 0.5).float())


def test_bad_focal_argument_types():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="gamma must be a float, got str"):
        fused_wloss.cross_entropy(x, torch.tensor([0, 1, 2, 0]), gamma="2")
    with pytest.raises(TypeError, match="alpha must be a float in \\[0, 1\\] or None, got bool"):
        fused_wloss.binary_cross_entropy_with_logits(x, torch.rand(4, 3), alpha=True)
