"""Mixed precision: fused_wloss under ``torch.autocast`` returns torch's float32 loss.

torch runs its cross-entropy and BCE-with-logits under autocast's float32 policy: a float16 or
bfloat16 call returns a float32 loss (so ``GradScaler`` can scale it without overflow) and a
gradient of the logits in their own dtype. fused_wloss gives the same dtypes and, without torch's
float32 copy of the logits, the loss of the half-precision logits to float32 precision.

Every test runs on each path that serves a CPU call: the CPU kernels, the emulated CUDA kernels
(the CUDA host code and kernels, run on the CPU) and the reference fallback; the same checks on a
GPU under CUDA autocast are at the end (skipped without one).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import BatchWeighting, ops, reference

from helpers import emulation_namespace, gpu_calls, gpu_device, gpu_param, skip_without_gpu, value_and_grad
from samples import Sample

REQUIRE_EMU = os.environ.get("FUSED_WLOSS_REQUIRE_EMU") == "1"
HALF = [torch.bfloat16, torch.float16]


EMU_NS = emulation_namespace()


@contextlib.contextmanager
def _reference_only():
    """Send every call to the reference, as on a device without kernels."""
    before = fused_wloss._backend.use_extension
    try:
        fused_wloss.functional.use_extension = lambda device: False
        yield
    finally:
        fused_wloss.functional.use_extension = before


class Path:
    def __init__(self, name):
        self.name = name
        self.device = gpu_device() if name == "cuda" else "cpu"

    def calls(self):
        if self.name == "emu":
            return ops.use_namespace(EMU_NS)
        if self.name == "reference":
            return _reference_only()
        return gpu_calls() if self.name == "cuda" else contextlib.nullcontext()

    def autocast(self, dtype):
        return torch.autocast(self.device, dtype=dtype)

    def __repr__(self):
        return self.name


@pytest.fixture(params=["cpu", "emu", "reference", gpu_param()])
def path(request):
    if request.param in ("cpu", "emu") and fused_wloss.backend("cpu") != "extension":
        pytest.skip("the compiled CPU kernels are not built")
    if request.param == "emu" and EMU_NS is None:
        reason = "the emulated CUDA kernels (fused_wloss._cuda_emu) are not built: run `make setup`"
        if REQUIRE_EMU:
            pytest.fail(reason + " (FUSED_WLOSS_REQUIRE_EMU=1)")
        pytest.skip(reason)
    if request.param == "cuda":
        skip_without_gpu()
    return Path(request.param)


# options: (kwargs, whether torch's own function takes them)
CE_OPTIONS = {
    "plain": ({}, True),
    "weight": ({"weight": "class"}, True),
    "ignore_index": ({"ignore_index": 2}, True),
    "label_smoothing": ({"label_smoothing": 0.1}, True),
    "everything_torch_has": ({"weight": "class", "ignore_index": 2, "label_smoothing": 0.2}, True),
    "sample_weight": ({"sample_weight": "sample"}, False),
    "dynamic": ({"class_weighting": "inverse"}, False),
    "dynamic_smoothing": ({"class_weighting": BatchWeighting("inverse_sqrt", smoothing=1.0), "label_smoothing": 0.1,
                           "weight": "class"}, False),
    "focal": ({"gamma": 2.0, "class_weighting": "inverse"}, False),
}
REDUCTIONS = ["none", "sum", "mean", "sample_mean"]
# (N, C) for the tiled and the rows layouts, (N, C, H, W) for K-dim inputs
CE_SHAPES = {"tiled": (64, 10), "rows": (48, 300), "kdim": (4, 5, 3, 7)}


def _ce_case(shape, options, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    C = shape[1]
    t = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), generator=gen)
    kw = {}
    for k, v in options.items():
        if v == "class":
            v = torch.rand(C, generator=gen) + 0.5
        elif v == "sample":
            v = torch.rand(t.shape, generator=gen) + 0.5
        kw[k] = v
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return x.to(device), t.to(device), {k: move(v) for k, v in kw.items()}


def _float32_expected(fn, x, t, kw):
    """The float32 loss of the half-precision logits, and its gradient, outside autocast."""
    return value_and_grad(fn, Sample("expected", (x.float(), t), kw, True))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", sorted(CE_OPTIONS))
@pytest.mark.parametrize("shape", sorted(CE_SHAPES))
def test_cross_entropy_loss_is_float32(path, dtype, reduction, options, shape):
    kw_opts, torch_ok = CE_OPTIONS[options]
    x, t, kw = _ce_case(CE_SHAPES[shape], kw_opts, dtype, path.device)
    kw["reduction"] = reduction
    with path.calls(), path.autocast(dtype):
        loss, grad = value_and_grad(fused_wloss.cross_entropy, Sample("ours", (x, t), kw, torch_ok))
    assert loss.dtype == torch.float32
    assert grad.dtype == dtype
    # the loss to float32 precision: the value of these half-precision logits, computed in float32
    exp_loss, exp_grad = _float32_expected(reference.cross_entropy, x, t, kw)
    torch.testing.assert_close(loss, exp_loss, rtol=2e-5, atol=2e-6)
    # the gradient: float32 math rounded once to the logits' dtype
    torch.testing.assert_close(grad, exp_grad.to(dtype), rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-5)
    if torch_ok and reduction != "sample_mean":
        with path.autocast(dtype):
            torch_loss, torch_grad = value_and_grad(F.cross_entropy, Sample("torch", (x, t), kw, True))
        assert torch_loss.dtype == loss.dtype and torch_grad.dtype == grad.dtype
        torch.testing.assert_close(loss, torch_loss, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad, torch_grad, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-5)


BCE_OPTIONS = {
    "plain": ({}, True),
    "weight_pos_weight": ({"weight": "label", "pos_weight": "label"}, True),
    "sample_weight": ({"sample_weight": "sample"}, False),
    "dynamic": ({"class_weighting": "inverse"}, False),
    "balanced": ({"class_weighting": "balanced", "pos_weight": "label"}, False),
    "focal": ({"gamma": 2.0, "alpha": 0.25}, False),
}


def _bce_case(shape, options, dtype, device, target_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    t = (torch.rand(shape, generator=gen) < 0.3).to(target_dtype or dtype)
    kw = {}
    for k, v in options.items():
        if v == "label":
            v = torch.rand(shape[-1], generator=gen) + 0.5
        elif v == "sample":
            v = torch.rand(shape[:-1], generator=gen) + 0.5
        kw[k] = v
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return x.to(device), t.to(device), {k: move(v) for k, v in kw.items()}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", sorted(BCE_OPTIONS))
@pytest.mark.parametrize("shape", [(64, 10), (33, 70)], ids=str)
def test_bce_loss_is_float32(path, dtype, reduction, options, shape):
    kw_opts, torch_ok = BCE_OPTIONS[options]
    x, t, kw = _bce_case(shape, kw_opts, dtype, path.device)
    kw["reduction"] = reduction
    with path.calls(), path.autocast(dtype):
        loss, grad = value_and_grad(fused_wloss.binary_cross_entropy_with_logits, Sample("ours", (x, t), kw, torch_ok))
    assert loss.dtype == torch.float32
    assert grad.dtype == dtype
    exp_loss, exp_grad = _float32_expected(reference.binary_cross_entropy_with_logits, x, t.float(), kw)
    torch.testing.assert_close(loss, exp_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, exp_grad.to(dtype), rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-5)
    if torch_ok and reduction != "sample_mean":
        with path.autocast(dtype):
            torch_loss, torch_grad = value_and_grad(F.binary_cross_entropy_with_logits, Sample("torch", (x, t), kw, True))
        assert torch_loss.dtype == loss.dtype and torch_grad.dtype == grad.dtype
        torch.testing.assert_close(loss, torch_loss, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad, torch_grad, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("options", ["plain", "weight_pos_weight", "balanced", "focal"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bce_float32_targets_with_half_logits(path, dtype, autocast, options, reduction):
    """The usual mixed-precision call: half-precision logits from an autocast model, float32
    targets from the data loader. The kernels read the float32 targets as they are; the loss is
    float32 with or without autocast, as torch promotes it."""
    kw_opts, torch_ok = BCE_OPTIONS[options]
    x, t, kw = _bce_case((40, 9), kw_opts, dtype, path.device, target_dtype=torch.float32)
    t = t * 0.9 + 0.05  # soft, so that a rounding of the targets to the logits' dtype would show
    kw["reduction"] = reduction
    region = path.autocast(dtype) if autocast else contextlib.nullcontext()
    with path.calls(), region:
        loss, grad = value_and_grad(fused_wloss.binary_cross_entropy_with_logits, Sample("ours", (x, t), kw, True))
    assert loss.dtype == torch.float32
    assert grad.dtype == dtype
    exp_loss, exp_grad = _float32_expected(reference.binary_cross_entropy_with_logits, x, t, kw)
    torch.testing.assert_close(loss, exp_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, exp_grad.to(dtype), rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-5)
    if torch_ok:
        with region:
            torch_loss, torch_grad = value_and_grad(F.binary_cross_entropy_with_logits, Sample("torch", (x, t), kw, True))
        assert torch_loss.dtype == loss.dtype and torch_grad.dtype == grad.dtype
        # outside autocast torch computes part of the loss in the logits' dtype: its error is theirs
        # (ours is checked against the float32 value above)
        loss_tol = (2e-5, 2e-6) if autocast else (2e-2, 2e-2)
        grad_tol = (1e-2 if dtype == torch.bfloat16 else 2e-3, 1e-5) if autocast else (2e-2, 1e-2)
        torch.testing.assert_close(loss, torch_loss, rtol=loss_tol[0], atol=loss_tol[1])
        torch.testing.assert_close(grad, torch_grad, rtol=grad_tol[0], atol=grad_tol[1])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_modules_and_stats(path, dtype):
    x, t, _ = _ce_case((32, 6), {}, dtype, path.device)
    xb, tb, _ = _bce_case((32, 6), {}, dtype, path.device)
    ce = fused_wloss.CrossEntropyLoss(class_weighting="inverse", label_smoothing=0.05)
    bce = fused_wloss.BCEWithLogitsLoss(class_weighting="balanced")
    with path.calls(), path.autocast(dtype):
        ce_loss, ce_stats = ce(x, t, return_stats=True)
        bce_loss, bce_stats = bce(xb, tb, return_stats=True)
    assert ce_loss.dtype == bce_loss.dtype == torch.float32
    for stats in (ce_stats, bce_stats):
        for field, value in stats._asdict().items():
            assert value.dtype == torch.float32, field
    torch.testing.assert_close(ce_loss, ce(x.float(), t), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(bce_loss, bce(xb.float(), tb.float()), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", HALF + [torch.float32, torch.float64], ids=str)
def test_outside_autocast_nothing_changes(path, dtype):
    x, t, _ = _ce_case((16, 7), {}, dtype, path.device)
    xb, tb, _ = _bce_case((16, 7), {}, dtype, path.device)
    with path.calls():
        assert fused_wloss.cross_entropy(x, t).dtype == dtype
        assert fused_wloss.binary_cross_entropy_with_logits(xb, tb, reduction="none").dtype == dtype
        # float32 and float64 calls under autocast are not cast either, as torch's
        if dtype in (torch.float32, torch.float64):
            with path.autocast(torch.bfloat16):
                assert fused_wloss.cross_entropy(x, t).dtype == dtype
                assert fused_wloss.binary_cross_entropy_with_logits(xb, tb).dtype == dtype


def test_autocast_of_another_device_type_changes_nothing():
    """Autocast is per device type: a CPU call while only CUDA autocast is on is not cast (the
    CUDA state is set directly, which needs no GPU)."""
    x, t, _ = _ce_case((8, 5), {}, torch.bfloat16, "cpu")
    before = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    try:
        assert fused_wloss.cross_entropy(x, t).dtype == torch.bfloat16
        assert fused_wloss.binary_cross_entropy_with_logits(x, x).dtype == torch.bfloat16
    finally:
        torch.set_autocast_enabled("cuda", before)


def _train(path, loss_fn, steps=12):
    """A small fp16 model trained with GradScaler under autocast; returns the scales seen."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).to(path.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(path.device)
    x = torch.randn(64, 16, device=path.device) * 4
    y = torch.randint(0, 10, (64,), device=path.device)
    scales = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with path.calls(), path.autocast(torch.float16):
            loss = loss_fn(model(x), y)
        assert loss.dtype == torch.float32
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, loss.item()


def _ce_step(logits, y):
    return fused_wloss.cross_entropy(logits, y, class_weighting="inverse")


def _bce_step(logits, y):
    # one positive label in ten, weighted up as usual: pos_weight = negatives / positives
    return fused_wloss.binary_cross_entropy_with_logits(logits, F.one_hot(y, 10).to(logits.dtype),
                                                        pos_weight=logits.new_full((10,), 9.0))


@pytest.mark.parametrize("loss_fn", [_ce_step, _bce_step], ids=["cross_entropy", "bce"])
def test_grad_scaler_takes_every_step(path, loss_fn):
    """A float16 loss times the default scale 2^16 overflows once the loss passes 1: the step is
    skipped and the scale halved. With torch's float32 loss the scale never drops."""
    scales, last = _train(path, loss_fn)
    assert scales == [2.0**16] * len(scales), scales
    assert last * 2.0**16 > 65504  # the scaled loss would not fit in float16
    # the control: the same loop with the loss rounded to float16, as fused_wloss returned it
    # before, skips its first steps
    half_scales, _ = _train(path, lambda logits, y: loss_fn(logits, y).half().float())
    assert half_scales[0] < 2.0**16


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_compile_with_autocast_inside(path, dtype):
    x, t, _ = _ce_case((32, 12), {}, dtype, path.device)
    xb, tb, _ = _bce_case((32, 12), {}, dtype, path.device)

    def step(x, t, xb, tb):
        with torch.autocast(path.device, dtype=dtype):
            a = fused_wloss.cross_entropy(x, t, class_weighting="inverse", label_smoothing=0.1)
            b = fused_wloss.binary_cross_entropy_with_logits(xb, tb, class_weighting="inverse", reduction="none")
        return a, b

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with path.calls():
        xg, xbg = x.clone().requires_grad_(True), xb.clone().requires_grad_(True)
        a, b = compiled(xg, t, xbg, tb)
        (a + b.sum()).backward()
        xe, xbe = x.clone().requires_grad_(True), xb.clone().requires_grad_(True)
        ea, eb = step(xe, t, xbe, tb)
        (ea + eb.sum()).backward()
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, ea)
    torch.testing.assert_close(b, eb)
    torch.testing.assert_close(xg.grad, xe.grad)
    torch.testing.assert_close(xbg.grad, xbe.grad)


def test_loss_dtype_argument_is_checked():
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    t = torch.tensor([0, 1, 2, 0])
    with pytest.raises(RuntimeError, match="loss_dtype must be the input's dtype"):
        torch.ops.fused_wloss.cross_entropy_forward(x, t, None, None, -100, 0.0, 2, 0, 1.0, 0.999, 0.0, torch.float64)
    with pytest.raises(RuntimeError, match="loss_dtype must be the input's dtype"):
        torch.ops.fused_wloss.bce_forward(x, x, None, None, None, 2, 0, 1.0, 0.999, False, 0.0, -1.0, torch.float16)
