"""Fused linear + weighted cross-entropy (fused_wloss/linear.py).

The fused path against the composition it replaces, computed by the reference
(``reference.cross_entropy(F.linear(...))``) in float64, and against torch's own
``F.linear_cross_entropy`` where this torch has it: every option and reduction, leading shapes
(H,), (N, H) and (B, T, H), chunk boundaries (a chunk of one row, N not a multiple of the chunk,
N smaller than a chunk), ignored rows, dynamic and sample weights, focal loss; on every kernel path
(CPU builds, the emulated CUDA kernels, the GPU). Then gradcheck, opcheck, torch.compile,
autocast, the module's drop-in layout, the unfused routes, bad input, and the memory claim in a
fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fused_wloss
from fused_wloss import BatchWeighting, linear, reference

from fuzzing import fuzz_settings
from helpers import kernel_paths, on_device, path_params, serve

pytestmark = pytest.mark.skipif(fused_wloss.backend("cpu") != "extension", reason="compiled CPU kernels not loaded")

PATHS = path_params(kernel_paths(gpu=True))
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")

OPTIONS = {
    "plain": {},
    "weight": {"weight": "class"},
    "smoothing": {"label_smoothing": 0.2},
    "sample_weight": {"sample_weight": "sample"},
    "inverse": {"class_weighting": "inverse"},
    "focal": {"gamma": 2.0, "weight": "class"},
    "everything": {"weight": "class", "label_smoothing": 0.1, "sample_weight": "sample",
                   "class_weighting": BatchWeighting("effective_number", beta=0.9)},
}
REDUCTIONS = ["none", "sum", "mean", "sample_mean"]


def _case(lead, hidden, num_classes, options, dtype=torch.float64, seed=0, bias=True, ignored=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((*lead, hidden), generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(num_classes, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5).to(dtype)
    b = torch.randn(num_classes, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, num_classes, lead, generator=gen)
    if ignored and t.numel() > 2:
        t.view(-1)[1] = -100
        t.view(-1)[-1] = -100
    kw = {}
    for k, v in options.items():
        if v == "class":
            kw[k] = (torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        elif v == "sample":
            kw[k] = (torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        else:
            kw[k] = v
    return x, w, b, t, kw


def _grads(fn, x, w, b, seed=5):
    leaves = [v.detach().clone().requires_grad_(True) if v is not None else None for v in (x, w, b)]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    g = (torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype).to(out.device)
    wrt = [v for v in leaves if v is not None]
    return out.detach(), torch.autograd.grad(out, wrt, g)


def _composition(x, w, b, t, reduction, kw):
    """The oracle: the reference cross-entropy of the full logits (rows of C)."""
    logits = F.linear(x, w, b)
    C = w.shape[0]
    kw = dict(kw)
    if "sample_weight" in kw:
        kw["sample_weight"] = kw["sample_weight"].reshape(-1)
    out = reference.cross_entropy(logits.reshape(-1, C), t.reshape(-1), reduction=reduction, **kw)
    return out.reshape(t.shape) if reduction == "none" else out


@pytest.fixture
def fused_only(monkeypatch):
    """Fails a test whose call would leave the fused path for the unfused composition."""
    def refuse(*args, **kwargs):
        raise AssertionError("linear_cross_entropy took the unfused path")
    monkeypatch.setattr(linear, "_unfused", refuse)


def _refuse_rows(monkeypatch):
    """Fails a call that forms chunks of whole rows (class tiles never do)."""
    def refuse(*args, **kwargs):
        raise AssertionError("linear_cross_entropy took whole rows, not class tiles")
    monkeypatch.setattr(linear, "_chunks", refuse)


def _assert_close(actual, expected, dtype, what):
    tol = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-5, 2e-6)}.get(dtype, (2e-2, 2e-2))
    torch.testing.assert_close(actual.double(), expected.double().to(actual.device), rtol=tol[0], atol=tol[1],
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _check(path, lead, hidden, num_classes, options, reduction, chunk_size, bias=True, dtype=torch.float64):
    x, w, b, t, kw = _case(lead, hidden, num_classes, options, dtype, bias=bias)
    want, want_grads = _grads(lambda x, w, b: _composition(x, w, b, t, reduction, kw), x, w, b)
    with serve(path):
        x, w, b, t, kw = on_device(path, x, w, b, t, kw)
        got, got_grads = _grads(
            lambda x, w, b: fused_wloss.linear_cross_entropy(
                x, w, t, linear_bias=b, reduction=reduction, chunk_size=chunk_size, **kw), x, w, b)
    assert got.shape == want.shape
    _assert_close(got, want, dtype, "loss")
    for name, g, h in zip(["input", "linear_weight", "linear_bias"], got_grads, want_grads):
        _assert_close(g, h, dtype, f"grad of {name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_fused_matches_composition(fused_only, path, option, reduction):
    _check(path, (29,), 12, 17, OPTIONS[option], reduction, chunk_size=8)


CHUNKINGS = {  # (rows, chunk_size)
    "one-row-chunks": (9, 1),
    "ragged-last-chunk": (23, 5),
    "rows-fewer-than-chunk": (6, 64),
    "exact-chunks": (24, 8),
    "default-chunk": (40, None),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
def test_chunk_boundaries(fused_only, path, chunking, reduction):
    rows, chunk = CHUNKINGS[chunking]
    _check(path, (rows,), 10, 13, OPTIONS["everything"], reduction, chunk_size=chunk)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("lead", [(), (3, 7), (2, 3, 4)], ids=["unbatched", "BT", "BTU"])
def test_leading_shapes(fused_only, path, lead, reduction):
    options = dict(OPTIONS["inverse"])
    if lead:
        options["sample_weight"] = "sample"
    _check(path, lead, 8, 11, options, reduction, chunk_size=4)


@pytest.mark.parametrize("path", PATHS)
def test_without_bias_and_with_int32_targets(fused_only, path):
    _check(path, (15,), 6, 9, OPTIONS["weight"], "mean", chunk_size=4, bias=False)
    x, w, b, t, kw = _case((15,), 6, 9, {})
    want = _composition(x, w, b, t, "sum", kw)
    with serve(path):
        x, w, b, t = on_device(path, x, w, b, t)
        got = fused_wloss.linear_cross_entropy(x, w, t.int(), linear_bias=b, reduction="sum", chunk_size=4)
    _assert_close(got, want, torch.float64, "int32 targets")


HALF_CHUNKS = {"rows": 16, "class-tiles": (16, 7), "class-tiles-one-block": (64, 7)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", sorted(HALF_CHUNKS))
def test_low_precision(fused_only, monkeypatch, path, dtype, chunk):
    """float32 to float32 precision; half inputs within the error of torch's own composition in
    that dtype, both measured against float64. In chunks of whole rows, in class tiles over several
    blocks of rows (the weight's gradient summed over them in float32) and in one block."""
    chunk = HALF_CHUNKS[chunk]
    if isinstance(chunk, tuple):
        _refuse_rows(monkeypatch)
    x, w, b, t, kw = _case((40,), 32, 50, OPTIONS["weight"], torch.float64)
    exact, exact_grads = _grads(lambda x, w, b: _composition(x, w, b, t, "mean", kw), x, w, b)
    lo = [v.to(dtype) for v in (x, w, b)]
    kw_lo = {"weight": kw["weight"].to(dtype)}
    torch_out, torch_grads = _grads(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, **kw_lo), *lo)
    with serve(path):
        lo_d, t_d, kw_d = on_device(path, lo, t, kw_lo)
        got, got_grads = _grads(
            lambda x, w, b: fused_wloss.linear_cross_entropy(x, w, t_d, linear_bias=b, chunk_size=chunk, **kw_d),
            *lo_d)
    assert got.dtype == dtype and all(g.dtype == dtype for g in got_grads)
    if dtype == torch.float32:
        _assert_close(got, exact, dtype, "loss")
        return
    err = (got.double().cpu() - exact).abs().item()
    torch_err = (torch_out.double() - exact).abs().item()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)
    for g, h, e in zip(got_grads, torch_grads, exact_grads):
        g_err = (g.double().cpu() - e).abs().max().item()
        h_err = (h.double() - e).abs().max().item()
        assert g_err <= 2 * h_err + 1e-3, (g_err, h_err)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk", [7, (7, 8)], ids=["rows", "class-tiles"])
def test_autocast_float32_loss(fused_only, monkeypatch, path, chunk):
    """Under autocast the matmuls run in bfloat16, as F.linear's would, and the loss is float32;
    the gradients reach the float32 leaves."""
    if isinstance(chunk, tuple):
        _refuse_rows(monkeypatch)
    x, w, b, t, kw = _case((24,), 16, 30, OPTIONS["inverse"], torch.float32)
    device = "cuda" if path == "cuda" else "cpu"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _grads(lambda x, w, b: fused_wloss.cross_entropy(F.linear(x, w, b), t, **kw), x, w, b)
    with serve(path):
        x, w, b, t = on_device(path, x, w, b, t)
        with torch.autocast(x.device.type if device == "cuda" else "cpu", dtype=torch.bfloat16):
            got, got_grads = _grads(
                lambda x, w, b: fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk, **kw),
                x, w, b)
    assert got.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got_grads)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g.cpu(), h, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mixed", [False, True], ids=["float32-leaves", "bfloat16-input-float32-head"])
def test_autocast_class_tiles_cast_a_tile_at_a_time(fused_only, monkeypatch, path, mixed):
    """Under autocast, class tiles take the float32 head (and float32 input) as they are and cast
    a tile at a time: no bfloat16 copy of the whole weight, gradients in the leaves' dtypes, the
    values of the composition under autocast."""
    _refuse_rows(monkeypatch)
    seen = []
    stats = linear._tiled_stats

    def spy(input, linear_weight, *args):
        seen.append((input.dtype, linear_weight.dtype, args[-1]))
        return stats(input, linear_weight, *args)

    monkeypatch.setattr(linear, "_tiled_stats", spy)
    x, w, b, t, kw = _case((24,), 16, 30, OPTIONS["everything"], torch.float32)
    if mixed:
        x = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _grads(lambda x, w, b: fused_wloss.cross_entropy(F.linear(x, w, b), t, **kw), x, w, b)
    with serve(path):
        x, w, b, t, kw = on_device(path, x, w, b, t, kw)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):  # (the lane's dry run serves "cuda" on the CPU)
            got, got_grads = _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(
                x, w, t, linear_bias=b, chunk_size=(10, 8), **kw), x, w, b)
    assert seen == [(x.dtype, torch.float32, torch.bfloat16)]
    assert got.dtype == torch.float32
    assert [g.dtype for g in got_grads] == [x.dtype, torch.float32, torch.float32]
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g.cpu().float(), h.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [16, (16, 64)], ids=["rows", "class-tiles"])
def test_loss_scale_reaches_half_gradients(fused_only, monkeypatch, path, dtype, chunk):
    """A GradScaler's 2^16 times the loss: float16 recomputes in the backward, so its gradients
    are formed with the scale (no underflow, no inf from the scale in float16); bfloat16 scales the
    forward's gradients in float32 (class tiles always recompute). Both within a few
    half-precision ulps of the scaled float64 composition, as torch's own composition in that dtype."""
    if isinstance(chunk, tuple):
        _refuse_rows(monkeypatch)
    x, w, b, t, kw = _case((64,), 16, 200, {"weight": "class"}, torch.float64)
    scale = 2.0 ** 16
    exact = torch.autograd.grad(_composition(x.requires_grad_(True), w.requires_grad_(True), b, t, "mean", kw),
                                (x, w), torch.tensor(scale, dtype=torch.float64))
    x, w = x.detach(), w.detach()
    with serve(path):
        xs, ws, bs, ts, kws = on_device(path, x.float(), w.float(), b.float(), t, {"weight": kw["weight"].float()})
        xs, ws = xs.requires_grad_(True), ws.requires_grad_(True)
        with torch.autocast(xs.device.type, dtype=dtype):  # (the lane's dry run serves "cuda" on the CPU)
            loss = fused_wloss.linear_cross_entropy(xs, ws, ts, linear_bias=bs, chunk_size=chunk, **kws)
        got = torch.autograd.grad(loss, (xs, ws), torch.tensor(scale, device=xs.device))
    for g, e in zip(got, exact):
        assert torch.isfinite(g).all()
        rel = ((g.double().cpu() - e).abs().max() / e.abs().max()).item()
        assert rel < (2e-2 if dtype == torch.bfloat16 else 4e-3), rel


def test_bfloat16_upstream_gradient_is_not_rounded(fused_only):
    """Under autocast the loss is float32, and so is its upstream gradient: it must reach the
    bfloat16 gradients unrounded."""
    x, w, b, t, _ = _case((32,), 8, 20, {}, torch.float32)
    xb, wb = x.bfloat16().requires_grad_(True), w.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_wloss.linear_cross_entropy(xb, wb, t, chunk_size=8)
    assert loss.dtype == torch.float32
    (third,) = torch.autograd.grad(loss, xb, torch.tensor(1 / 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_wloss.linear_cross_entropy(xb, wb, t, chunk_size=8)
    (one,) = torch.autograd.grad(loss, xb)
    # elementwise the two differ by bfloat16 rounding, symmetric around 1; a grad_output rounded to
    # bfloat16 (0.333984 for 1/3) would shift every ratio by +2e-3
    big = one.double().abs() > one.double().abs().median()
    ratio = ((third.double() * 3)[big] / one.double()[big]).median()
    assert abs(ratio.item() - 1) < 5e-4, ratio


def test_autocast_takes_mixed_dtypes_as_f_linear_does(fused_only):
    """bfloat16 hidden states from an earlier autocast layer with a float32 head."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=gen).bfloat16()
    w, b = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    t = torch.randint(0, 5, (8,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fused_wloss.cross_entropy(F.linear(x, w, b), t)
        got = fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    with pytest.raises(TypeError, match="linear_weight must have the input's dtype"):
        fused_wloss.linear_cross_entropy(x, w, t)  # outside autocast, as F.linear


def test_zero_features_and_numpy_ints():
    import numpy as np

    t = torch.tensor([0, 1, 2, 3, 4, 1])
    got = fused_wloss.linear_cross_entropy(torch.randn(6, 0), torch.randn(5, 0), t, linear_bias=torch.arange(5.0))
    torch.testing.assert_close(got, F.cross_entropy(torch.arange(5.0).expand(6, 5), t))
    x, w, b, t, _ = _case((9,), 4, 6, {})
    got = fused_wloss.linear_cross_entropy(x, w, t, ignore_index=np.int64(-100), chunk_size=np.int32(4))
    _assert_close(got, _composition(x, w, None, t, "mean", {}), torch.float64, "numpy ints")


def test_double_backward_is_refused_clearly(fused_only):
    x, w, b, t, _ = _case((8,), 4, 5, {})
    x.requires_grad_(True)
    loss = fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_all_rows_ignored_gives_nan_mean_as_torch(fused_only):
    x, w, b, t, _ = _case((5,), 4, 3, {})
    t.fill_(-100)
    got, (gx, gw, gb) = _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b), x, w, b)
    want = F.cross_entropy(F.linear(x, w, b), t)
    assert torch.isnan(got) and torch.isnan(want)
    assert torch.equal(gx, torch.zeros_like(gx)) or torch.isnan(gx).all()
    total = fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum")
    assert total.item() == 0.0


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="this torch has no F.linear_cross_entropy (torch >= 2.13)")
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("chunked", [False, True], ids=["torch-reference", "torch-chunked"])
def test_matches_torch_linear_cross_entropy(fused_only, reduction, chunked):
    # torch's chunked path takes no label smoothing (it warns and falls back): there, without
    options = {"weight": "class"} if chunked else {"weight": "class", "label_smoothing": 0.1}
    x, w, b, t, kw = _case((33,), 16, 21, options)
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    want, want_grads = _grads(lambda x, w, b: F.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, options=options, **kw), x, w, b)
    got, got_grads = _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, chunk_size=10, **kw), x, w, b)
    _assert_close(got, want, torch.float64, "loss")
    for g, h in zip(got_grads, want_grads):
        _assert_close(g, h, torch.float64, "grad")


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck(fused_only, path):
    """gradcheck runs several backwards through one graph: the "none" path, whose backward
    recomputes the logits (a reduced loss hands its gradients over once, see the next test; its
    gradients are checked against the float64 composition above)."""
    x, w, b, t, kw = _case((7,), 5, 6, OPTIONS["everything"])
    with serve(path):
        x, w, b, t, kw = on_device(path, x, w, b, t, kw)
        leaves = [v.detach().requires_grad_(True) for v in (x, w, b)]
        assert torch.autograd.gradcheck(
            lambda x, w, b: fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none",
                                                             chunk_size=3, **kw), leaves)


def test_reduced_loss_backward_runs_once_with_a_clear_error(fused_only):
    x, w, b, t, _ = _case((8,), 4, 5, {})
    x.requires_grad_(True)
    loss = fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=3)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(first, torch.autograd.grad(_composition(x, w, b, t, "mean", {}), x)[0])
    with pytest.raises(RuntimeError, match="runs once"):
        torch.autograd.grad(loss, x)
    # "none" recomputes, so its graph can be walked again
    out = fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", chunk_size=3).sum()
    a = torch.autograd.grad(out, x, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], a)


def test_opcheck():
    x, w, b, t, kw = _case((11,), 6, 9, OPTIONS["weight"], torch.float32, ignored=True)
    cw = kw["weight"]
    sw = torch.rand(11) + 0.5
    scale = torch.tensor(0.25)
    for args in [
        (x, w, b, t, cw, sw, scale, -100, 0.1, True, 0.0, 4, [True, True, True], None),
        (x, w, None, t, None, None, scale, -100, 0.0, True, 2.0, 3, [True, False, False], None),
        (x, w, b, t, cw, None, scale, -100, 0.0, False, 0.0, 5, [True, True, True], None),
        (x.bfloat16(), w.bfloat16(), b.bfloat16(), t, cw, sw, scale, -100, 0.0, True, 0.0, 4, [True, True, True],
         torch.float32),
    ]:
        leaves = tuple(v.clone().requires_grad_(need) if v is not None else None for v, need in zip(args[:3], args[12]))
        torch.library.opcheck(torch.ops.fused_wloss.linear_cross_entropy_forward, leaves + args[3:])
    lse = torch.randn(2, 11)
    torch.library.opcheck(torch.ops.fused_wloss.linear_cross_entropy_backward,
                          (torch.rand(11), x, w, b, t, cw, sw, lse, -100, 0.0, 0.0, 4, [True, True, True]))


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "autocast"])
@pytest.mark.parametrize("chunk", [5, (5, 5)], ids=["rows", "class-tiles"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(fused_only, monkeypatch, reduction, chunk, amp):
    if isinstance(chunk, tuple):
        _refuse_rows(monkeypatch)
    x, w, b, t, kw = _case((4, 9), 8, 12, OPTIONS["everything"], torch.float32)

    def step(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=chunk,
                                                   **kw)
        return out if reduction != "none" else out.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_grads = _grads(compiled, x, w, b)
    want, want_grads = _grads(step, x, w, b)
    torch.testing.assert_close(got, want)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g, h)


def test_only_requested_gradients(fused_only):
    """A frozen head (linear weight without grad) or frozen features get only what they need, and
    a call without any gradient builds no graph."""
    x, w, b, t, _ = _case((10,), 6, 7, {})
    xg = x.clone().requires_grad_(True)
    out = fused_wloss.linear_cross_entropy(xg, w, t, linear_bias=b, chunk_size=3)
    (gx,) = torch.autograd.grad(out, xg)
    _, (want_gx, _, _) = _grads(lambda x, w, b: _composition(x, w, b, t, "mean", {}), x, w, b, seed=None or 5)
    assert gx.shape == x.shape
    wg = w.clone().requires_grad_(True)
    out = fused_wloss.linear_cross_entropy(x, wg, t, chunk_size=3)
    (gw,) = torch.autograd.grad(out, wg)
    torch.testing.assert_close(gw, torch.autograd.grad(_composition(x, wg, None, t, "mean", {}), wg)[0])
    out = fused_wloss.linear_cross_entropy(x, w, t)
    assert not out.requires_grad


def test_no_gradient_work_without_grad_mode(fused_only, monkeypatch):
    """Under no_grad (evaluation) the forward forms no gradient, also for leaves that require one."""
    x, w, b, t, _ = _case((10,), 6, 7, {})
    calls = []
    monkeypatch.setattr(linear._GradSink, "add", lambda *args: calls.append(args))
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.no_grad():
        out = fused_wloss.linear_cross_entropy(xg, wg, t, linear_bias=b, chunk_size=3)
    assert not calls and not out.requires_grad
    _assert_close(out, _composition(x, w, b, t, "mean", {}), torch.float64, "loss under no_grad")


def test_grad_of_weight_or_sample_weight_takes_the_unfused_path():
    x, w, b, t, kw = _case((9,), 5, 6, {"weight": "class", "sample_weight": "sample"})
    cw = kw["weight"].clone().requires_grad_(True)
    sw = kw["sample_weight"].clone().requires_grad_(True)
    out = fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, sample_weight=sw)
    got = torch.autograd.grad(out, (cw, sw))
    want = torch.autograd.grad(_composition(x, w, b, t, "mean", {"weight": cw, "sample_weight": sw}), (cw, sw))
    for g, h in zip(got, want):
        _assert_close(g, h, torch.float64, "grad of a weight")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_probability_targets_and_kdim_weight_are_unfused(reduction):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    q = torch.softmax(torch.randn(6, 4, dtype=torch.float64, generator=gen), -1)
    got = fused_wloss.linear_cross_entropy(x, w, q, reduction=reduction, label_smoothing=0.1)
    _assert_close(got, reference.cross_entropy(F.linear(x, w), q, reduction=reduction, label_smoothing=0.1),
                  torch.float64, "probability targets")
    wk = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen)
    bk = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    tk = torch.randint(0, 4, (6, 3), generator=gen)
    got = fused_wloss.linear_cross_entropy(x, wk, tk, linear_bias=bk, reduction=reduction)
    _assert_close(got, reference.cross_entropy(F.linear(x, wk.reshape(12, 5), bk.reshape(12)).reshape(6, 4, 3), tk,
                                               reduction=reduction), torch.float64, "K-dim weight")


@pytest.mark.parametrize("target_kind", ["index-learned-weight", "probabilities"])
def test_unfused_leading_shapes(target_kind):
    """(B, T, H) input on the unfused route: rows of C, the loss back in the leading shape."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    kw = {}
    if target_kind == "probabilities":
        t = torch.softmax(torch.randn(2, 3, 4, dtype=torch.float64, generator=gen), -1)
        want = reference.cross_entropy(F.linear(x, w).reshape(6, 4), t.reshape(6, 4), reduction="none")
    else:
        t = torch.randint(0, 4, (2, 3), generator=gen)
        kw["weight"] = (torch.rand(4, dtype=torch.float64, generator=gen) + 0.5).requires_grad_(True)
        kw["sample_weight"] = torch.rand(2, 3, dtype=torch.float64, generator=gen) + 0.5
        want = reference.cross_entropy(F.linear(x, w).reshape(6, 4), t.reshape(6), reduction="none",
                                       weight=kw["weight"], sample_weight=kw["sample_weight"].reshape(6))
    got = fused_wloss.linear_cross_entropy(x, w, t, reduction="none", **kw)
    assert got.shape == (2, 3)
    _assert_close(got, want.reshape(2, 3), torch.float64, target_kind)


def test_return_stats_are_the_call_s_weights():
    x, w, b, t, kw = _case((30,), 6, 5, {"sample_weight": "sample"})
    loss, stats = fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, class_weighting="inverse",
                                                   return_stats=True, **kw)
    want_loss, want_stats = fused_wloss.cross_entropy(F.linear(x, w, b), t, class_weighting="inverse",
                                                      return_stats=True, **kw)
    _assert_close(loss, want_loss, torch.float64, "loss")
    for name in ("counts", "class_weight", "normalizer"):
        _assert_close(getattr(stats, name), getattr(want_stats, name), torch.float64, name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", ["plain", "weight", "smoothing", "focal", "everything"])
@pytest.mark.parametrize("reduction", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gradient_written_over_the_logits_equals_the_backward(path, option, reduction, dtype):
    """cross_entropy_grad_ (the chunks' in-place gradient) against cross_entropy_backward, bitwise:
    every logit is read before its gradient is written, on the streamed, tiled and row paths."""
    gen = torch.Generator().manual_seed(2)
    opts = OPTIONS[option]
    for rows, C in [(37, 3), (20, 45), (9, 1000)]:
        x = (torch.randn(rows, C, generator=gen, dtype=torch.float64) * 3).to(dtype)
        t = torch.randint(0, C, (rows,), generator=gen)
        t[2] = -100
        weight = (torch.rand(C, generator=gen) + 0.5).to(dtype) if "weight" in opts else None
        sw = (torch.rand(rows, generator=gen) + 0.5).to(dtype) if "sample_weight" in opts else None
        ls, gamma = opts.get("label_smoothing", 0.0), opts.get("gamma", 0.0)
        with serve(path):
            x, t, weight, sw = on_device(path, x, t, weight, sw)
            ops = fused_wloss.ops._ops
            _, lse, cw, norm = ops.cross_entropy_forward(x, t, weight, sw, -100, ls, reduction, 0, 1.0, 0.999, gamma)
            g = torch.rand(rows if reduction == 0 else (), generator=gen, dtype=torch.float64).to(x.device) + 0.5
            want = ops.cross_entropy_backward(g, x, t, cw, sw, lse, norm, -100, ls, reduction, gamma)
            logits = x.clone()
            out = ops.cross_entropy_grad_(logits, g, t, cw, sw, lse, norm, -100, ls, reduction, gamma)
        assert out.data_ptr() == logits.data_ptr()
        assert torch.equal(logits, want), (rows, C)


@pytest.mark.parametrize("path", [p for p in kernel_paths() if p.startswith("cpu-")])
def test_gradient_written_over_the_logits_streamed(path):
    """A gradient of 16 MB or more is written with streaming stores (the true class folded into its
    vector): in place it still equals the backward's."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4200, 1000, generator=gen)
    t = torch.randint(0, 1000, (4200,), generator=gen)
    with serve(path):
        ops = fused_wloss.ops._ops
        _, lse, cw, norm = ops.cross_entropy_forward(x, t, None, None, -100, 0.1, 2, 0, 1.0, 0.999)
        g = torch.tensor(0.7)
        want = ops.cross_entropy_backward(g, x, t, cw, None, lse, norm, -100, 0.1, 2)
        logits = x.clone()
        ops.cross_entropy_grad_(logits, g, t, cw, None, lse, norm, -100, 0.1, 2)
    assert torch.equal(logits, want)


def test_gradient_over_the_logits_refuses_other_layouts():
    x, t = torch.randn(4, 5, 3), torch.randint(0, 5, (4, 3))
    _, lse, cw, norm = torch.ops.fused_wloss.cross_entropy_forward(x, t, None, None, -100, 0.0, 1, 0, 1.0, 0.999)
    with pytest.raises(RuntimeError, match=r"input must be contiguous logits of shape \(N, C\)"):
        torch.ops.fused_wloss.cross_entropy_grad_(x, torch.ones(()), t, cw, None, lse, norm, -100, 0.0, 1)


@pytest.mark.parametrize("path", PATHS)
def test_half_weight_gradient_in_class_blocks(fused_only, path, monkeypatch):
    """A half-precision weight gradient is added into its float32 sum a block of classes at a time:
    blocks of 7 classes (a ragged last one) give the unblocked sum's values."""
    x, w, b, t, _ = _case((50,), 64, 30, {}, torch.float32)
    with serve(path):
        x, w, b, t = on_device(path, x.bfloat16(), w.bfloat16(), b.bfloat16(), t)
        whole = _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=16),
                       x, w, b)[1]
        monkeypatch.setattr(linear, "_HALF_PRODUCT_BYTES", 64 * 2 * 7)
        blocks = _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=16),
                        x, w, b)[1]
    for g, h in zip(blocks, whole):  # (a GPU's BLAS may pick another algorithm for a block: ulps)
        torch.testing.assert_close(g.float(), h.float(), rtol=1e-2, atol=1e-4)


def test_default_chunk_rows():
    """8 MiB of logits, at least 64 rows while a chunk stays within 32 MiB, a power of two, within [1, N]."""
    assert linear.chunk_rows(16384, 1000, torch.float32) == 2048  # 8 MiB is 2097 rows
    assert linear.chunk_rows(4096, 32000, torch.float32) == 64  # 8 MiB is 65 rows
    assert linear.chunk_rows(4096, 32000, torch.bfloat16) == 128  # 131
    assert linear.chunk_rows(2048, 128256, torch.float32) == 64  # 8 MiB would be 16 rows
    assert linear.chunk_rows(2048, 1 << 20, torch.float32) == 8  # 64 rows would pass 32 MiB
    assert linear.chunk_rows(10, 1000, torch.float32) == 10
    assert linear.chunk_rows(0, 1000, torch.float32) == 1
    assert linear.chunk_rows(100, 1 << 24, torch.float32) == 1
    assert linear.chunk_rows(100, 1000, torch.float32, chunk_size=7) == 7


# ---- class tiles (the two-pass path of wide heads) -----------------------------------------------

@pytest.fixture
def tiles_only(fused_only, monkeypatch):
    """Fails a test whose fused call would not take class tiles (the chunks of whole rows are not
    formed on the tiled path)."""
    _refuse_rows(monkeypatch)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", sorted(OPTIONS) + ["focal-below-one"])
def test_class_tiles_match_composition(tiles_only, path, option, reduction):
    options = {"gamma": 0.5, "sample_weight": "sample"} if option == "focal-below-one" else OPTIONS[option]
    _check(path, (29,), 12, 17, options, reduction, chunk_size=(8, 5))


TILINGS = {  # (rows, classes, chunk_size)
    "one-class-tiles": (9, 6, (4, 1)),
    "one-row-blocks": (7, 13, (1, 4)),
    "ragged-last-tile-and-block": (23, 13, (5, 4)),
    "rows-fewer-than-block": (6, 13, (64, 6)),
    "exact-tiles": (24, 12, (8, 4)),
    "two-tiles": (10, 13, (10, 12)),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("tiling", sorted(TILINGS))
def test_tile_boundaries(tiles_only, path, tiling, reduction):
    rows, classes, chunk = TILINGS[tiling]
    _check(path, (rows,), 10, classes, OPTIONS["everything"], reduction, chunk_size=chunk)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lead", [(), (3, 7)], ids=["unbatched", "BT"])
def test_class_tiles_leading_shapes_and_no_bias(tiles_only, path, lead):
    _check(path, lead, 8, 11, {"weight": "class", "label_smoothing": 0.1}, "none", chunk_size=(4, 3), bias=False)


@pytest.mark.parametrize("path", PATHS)
def test_class_tiles_float32(tiles_only, path):
    """float32 to float32 precision: the log-sum-exp kept as (max, log of the sum) loses nothing
    to a large maximum (logits offset by 300)."""
    x, w, b, t, kw = _case((40,), 32, 50, OPTIONS["everything"], torch.float64)
    b = b + 300.0
    exact, exact_grads = _grads(lambda x, w, b: _composition(x, w, b, t, "mean", kw), x, w, b)
    with serve(path):
        args = on_device(path, x.float(), w.float(), b.float(), t, {k: v.float() if isinstance(v, torch.Tensor) else v
                                                                  for k, v in kw.items()})
        x32, w32, b32, t32, kw32 = args
        got, got_grads = _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(
            x, w, t32, linear_bias=b, chunk_size=(16, 7), **kw32), x32, w32, b32)
    _assert_close(got, exact, torch.float32, "loss")
    for name, g, h in zip(["input", "linear_weight", "linear_bias"], got_grads, exact_grads):
        _assert_close(g, h, torch.float32, f"grad of {name}")


def test_class_tiles_gradcheck(tiles_only):
    x, w, b, t, kw = _case((7,), 5, 6, OPTIONS["everything"])
    leaves = [v.detach().requires_grad_(True) for v in (x, w, b)]
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                                             chunk_size=(3, 4), **kw), leaves)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", [(0, 4), (5, 0)], ids=["no-rows", "no-features"])
def test_class_tiles_empty(tiles_only, shape, reduction):
    """No rows: zero gradients (a sum over nothing), the mean NaN as torch's; no features: logits
    of the bias alone."""
    x, w, b, t, _ = _case((shape[0],), shape[1], 7, {}, ignored=False)
    got, got_grads = _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, chunk_size=(2, 3)), x, w, b)
    want, want_grads = _grads(lambda x, w, b: _composition(x, w, b, t, reduction, {}), x, w, b)
    _assert_close(got, want, torch.float64, "loss")
    for name, g, h in zip(["input", "linear_weight", "linear_bias"], got_grads, want_grads):
        _assert_close(g, h, torch.float64, f"grad of {name}")


@pytest.mark.parametrize("masked", ["first-tile", "last-tile"])
def test_class_tiles_masked_classes_far_below_zero(tiles_only, masked):
    """A tile of masked classes (bias -inf: vocabulary padding) among logits near -1000: the
    running maximum must not start from the masked tile (exp(-1000) underflows to 0)."""
    x, w, _, t, kw = _case((6,), 5, 12, {"weight": "class"}, ignored=False)
    t = t % 8 if masked == "last-tile" else 4 + t % 8
    b = torch.full((12,), -1000.0, dtype=torch.float64)
    b[8:] = -torch.inf if masked == "last-tile" else -1000.0
    if masked == "first-tile":
        b[:4] = -torch.inf
    got, got_grads = _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction="sum", chunk_size=(4, 4), **kw), x, w, b)
    want, want_grads = _grads(lambda x, w, b: _composition(x, w, b, t, "sum", kw), x, w, b)
    _assert_close(got, want, torch.float64, "loss")
    for name, g, h in zip(["input", "linear_weight", "linear_bias"], got_grads, want_grads):
        _assert_close(g, h, torch.float64, f"grad of {name}")


def test_class_tiles_non_finite_logits_as_rows(tiles_only, monkeypatch):
    """A +inf or NaN logit makes its row's loss NaN, as the one-pass kernels and the reference."""
    x, w, b, t, _ = _case((4,), 5, 12, {}, ignored=False)
    b[9] = torch.inf
    x = x.clone()
    x[2, 0] = torch.nan
    got = fused_wloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", chunk_size=(4, 4))
    want = _composition(x, w, b, t, "none", {})
    assert got.isnan().all() and want.isnan().all()


@pytest.mark.parametrize("path", PATHS)
def test_class_tiles_under_deterministic_algorithms(tiles_only, monkeypatch, path):
    """torch.use_deterministic_algorithms(True) refuses scatter_add_ and scatter_ on CUDA: the
    tiles use none, and give the same bits as without the mode."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what the mode asks of cuBLAS users
    x, w, b, t, kw = _case((21,), 6, 13, OPTIONS["everything"], torch.float32)
    with serve(path):
        x, w, b, t, kw = on_device(path, x, w, b, t, kw)

        def run():
            return _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(
                x, w, t, linear_bias=b, reduction="none", chunk_size=(8, 5), **kw), x, w, b)

        free = run()
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            strict = run()
        finally:
            torch.use_deterministic_algorithms(before)
    assert torch.equal(free[0], strict[0]) and all(torch.equal(g, h) for g, h in zip(free[1], strict[1]))


@fuzz_settings(60)
@given(rows=st.integers(0, 30), hidden=st.integers(0, 6), classes=st.integers(2, 30), block=st.integers(1, 12),
       tile=st.integers(1, 29), option=st.sampled_from(sorted(OPTIONS) + ["focal-below-one"]),
       reduction=st.sampled_from(REDUCTIONS), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_class_tiles_property(rows, hidden, classes, block, tile, option, reduction, bias, seed):
    """Random shapes, blocks, tiles and options: class tiles (float64) against the reference
    composition, loss and every gradient."""
    tile = min(tile, classes - 1)
    options = {"gamma": 0.5, "sample_weight": "sample"} if option == "focal-below-one" else OPTIONS[option]
    x, w, b, t, kw = _case((rows,), hidden, classes, options, seed=seed, bias=bias)
    got, got_grads = _grads(lambda x, w, b: fused_wloss.linear_cross_entropy(
        x, w, t, linear_bias=b, reduction=reduction, chunk_size=(block, tile), **kw), x, w, b)
    want, want_grads = _grads(lambda x, w, b: _composition(x, w, b, t, reduction, kw), x, w, b)
    _assert_close(got, want, torch.float64, "loss")
    for name, g, h in zip(["input", "linear_weight", "linear_bias"], got_grads, want_grads):
        _assert_close(g, h, torch.float64, f"grad of {name}")


def test_half_leaves_sum_over_blocks_in_float32():
    """Half-precision leaves computed in float32 (the operator's compute_dtype): the weight's
    gradient over several blocks of rows is summed in float32 and rounded once, as in one block."""
    x, w, b, t, _ = _case((64,), 16, 40, {}, torch.float64, ignored=False)
    xh, wh = x.bfloat16(), w.bfloat16()
    ops = torch.ops.fused_wloss
    grads = {}
    for rows in (8, 64):
        _, _, _, _, stats = ops.linear_cross_entropy_forward(
            xh, wh, None, t, None, None, torch.ones(()), -100, 0.0, False, 0.0, rows, [False] * 3, torch.float32, 7,
            torch.float32)
        grads[rows] = ops.linear_cross_entropy_backward(
            torch.ones(64), xh, wh, None, t, None, None, stats, -100, 0.0, 0.0, rows, [True, True, False], 7,
            torch.float32)
    for g8, g64 in zip(grads[8][:2], grads[64][:2]):
        assert g8.dtype == torch.bfloat16
        torch.testing.assert_close(g8.float(), g64.float(), rtol=8e-3, atol=1e-6)  # an ulp of bfloat16 at most


def test_class_tiles_backward_twice(tiles_only):
    """The tiled backward recomputes the logits: a second backward (retain_graph) works and agrees."""
    x, w, b, t, kw = _case((9,), 5, 6, OPTIONS["weight"])
    xg = x.clone().requires_grad_(True)
    loss = fused_wloss.linear_cross_entropy(xg, w, t, linear_bias=b, chunk_size=(4, 4), **kw)
    (first,) = torch.autograd.grad(loss, xg, retain_graph=True)
    (second,) = torch.autograd.grad(loss, xg)
    assert torch.equal(first, second)


def test_class_tiles_opcheck():
    x, w, b, t, kw = _case((11,), 6, 9, OPTIONS["weight"], torch.float32, ignored=True)
    cw, sw, scale = kw["weight"], torch.rand(11) + 0.5, torch.tensor(0.25)
    for args in [
        (x, w, b, t, cw, sw, scale, -100, 0.1, True, 0.0, 4, [True, True, True], None, 4),
        (x, w, None, t, None, None, scale, -100, 0.0, False, 2.0, 3, [True, False, False], None, 2),
        (x.bfloat16(), w.bfloat16(), b.bfloat16(), t, cw, sw, scale, -100, 0.1, True, 0.0, 4, [True, True, True],
         torch.float32, 4),
        (x.half(), w.half(), None, t, None, None, scale, -100, 0.0, False, 0.0, 4, [True, True, False], None, 4),
    ]:
        leaves = tuple(v.clone().requires_grad_(need) if v is not None else None for v, need in zip(args[:3], args[12]))
        torch.library.opcheck(torch.ops.fused_wloss.linear_cross_entropy_forward, leaves + args[3:])
    stats = torch.stack([torch.randn(11), torch.rand(11), torch.randn(11)])
    for dtype in (torch.float32, torch.bfloat16):
        x_, w_, b_ = (v.to(dtype) for v in (x, w, b))
        torch.library.opcheck(torch.ops.fused_wloss.linear_cross_entropy_backward,
                              (torch.rand(11), x_, w_, b_, t, cw, sw, stats, -100, 0.1, 0.0, 4, [True, True, True], 4))


def test_default_blocks():
    """Whole rows unless 64 of them pass 8 MiB with more than 256 rows; then blocks of up to 2048
    rows (half precision: 1024) by as many classes as fit in 8 MiB (half precision: 8 bytes a
    logit)."""
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    assert linear.plan_blocks(16384, 1000, f32) == (2048, 0)
    assert linear.plan_blocks(4096, 32000, f32) == (64, 0)  # 64 rows are 7.8 MiB
    assert linear.plan_blocks(2048, 128256, f32) == (2048, 1024)
    assert linear.plan_blocks(65536, 128256, f32) == (2048, 1024)
    assert linear.plan_blocks(1000, 128256, f32) == (1000, 2097)
    assert linear.plan_blocks(4096, 32000, f64) == (2048, 512)
    assert linear.plan_blocks(256, 128256, f32) == (64, 0)  # too few rows for tiles
    assert linear.plan_blocks(2048, 128256, bf16) == (1024, 1024)  # 8 bytes a logit, square
    assert linear.plan_blocks(4096, 32000, bf16) == (128, 0)  # 64 rows are 3.9 MiB
    # under autocast a float32 head whose bfloat16 copy would pass 8 MiB: tiles, cast a tile at a time
    assert linear.plan_blocks(4096, 32000, bf16, cast_head_bytes=32000 * 256 * 2) == (1024, 1024)
    assert linear.plan_blocks(16384, 1000, bf16, cast_head_bytes=1000 * 128 * 2) == (4096, 0)
    assert linear.plan_blocks(100, 128256, bf16, cast_head_bytes=128256 * 4096 * 2) == (100, 10485)  # any rows
    assert linear.plan_blocks(16384, 10, bf16, cast_head_bytes=10 * (1 << 20) * 2) == (16384, 0)  # one tile: rows
    assert linear.plan_blocks(2048, 128256, f32, 32) == (32, 0)
    assert linear.plan_blocks(2048, 128256, f32, (512, 4096)) == (512, 4096)
    assert linear.plan_blocks(10, 100, f32, (64, 100)) == (10, 0)  # a tile of every class: whole rows


# ---- the module ----------------------------------------------------------------------------------

def test_module_layout_and_values():
    torch.manual_seed(0)
    ours = fused_wloss.LinearCrossEntropyLoss(8, 6, bias=True, weight=torch.rand(6) + 0.5, label_smoothing=0.1,
                                              class_weighting="inverse", chunk_size=4)
    assert set(ours.state_dict()) == {"weight", "linear.weight", "linear.bias"}
    x, t = torch.randn(10, 8), torch.randint(0, 6, (10,))
    want = fused_wloss.cross_entropy(ours.linear(x), t, weight=ours.weight, label_smoothing=0.1,
                                     class_weighting="inverse")
    torch.testing.assert_close(ours(x, t), want)
    assert "class_weighting='inverse'" in repr(ours)


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="this torch has no nn.LinearCrossEntropyLoss (torch >= 2.13)")
def test_module_swaps_with_torch_s():
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(8, 6, bias=True, weight=torch.rand(6) + 0.5, label_smoothing=0.1)
    ours = fused_wloss.LinearCrossEntropyLoss(8, 6, bias=True, weight=torch.zeros(6), label_smoothing=0.1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x, t = torch.randn(10, 8), torch.randint(0, 6, (10,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))


# ---- bad input -----------------------------------------------------------------------------------

BAD = {
    "weight-hidden": (lambda x, w, t: ((x, w[:, :3], t), {}), ValueError, "in_features"),
    "weight-1d": (lambda x, w, t: ((x, w[0], t), {}), ValueError, "linear_weight must have shape"),
    "weight-dtype": (lambda x, w, t: ((x, w.double(), t), {}), TypeError, "linear_weight must have the input's dtype"),
    "bias-shape": (lambda x, w, t: ((x, w, t), {"linear_bias": torch.zeros(3)}), ValueError, "linear_bias must have shape"),
    "bias-dtype": (lambda x, w, t: ((x, w, t), {"linear_bias": torch.zeros(7, dtype=torch.float64)}), TypeError,
                   "linear_bias must have the input's dtype"),
    "target-shape": (lambda x, w, t: ((x, w, t[:3]), {}), ValueError, "target must have shape"),
    "target-dtype": (lambda x, w, t: ((x, w, t.to(torch.int16)), {}), TypeError, "target must be int64"),
    "prob-shape": (lambda x, w, t: ((x, w, torch.rand(5, 3)), {}), ValueError, "probability targets"),
    "weight-classes": (lambda x, w, t: ((x, w, t), {"weight": torch.ones(3)}), ValueError, "weight must have shape"),
    "sample-weight": (lambda x, w, t: ((x, w, t), {"sample_weight": torch.ones(3)}), ValueError, "sample_weight"),
    "reduction": (lambda x, w, t: ((x, w, t), {"reduction": "avg"}), ValueError, "reduction"),
    "smoothing": (lambda x, w, t: ((x, w, t), {"label_smoothing": 1.5}), ValueError, "label_smoothing"),
    "chunk": (lambda x, w, t: ((x, w, t), {"chunk_size": 0}), ValueError, "chunk_size"),
    "chunk-pair": (lambda x, w, t: ((x, w, t), {"chunk_size": (4, 0)}), ValueError, r"chunk_size must be .* pair"),
    "chunk-triple": (lambda x, w, t: ((x, w, t), {"chunk_size": (4, 2, 1)}), ValueError, "chunk_size"),
    "chunk-float": (lambda x, w, t: ((x, w, t), {"chunk_size": 2.5}), ValueError, "chunk_size"),
    "int-input": (lambda x, w, t: ((x.long(), w, t), {}), TypeError, "input must be a floating-point"),
    "0d-input": (lambda x, w, t: ((x[0, 0], w, t), {}), ValueError, "0-d"),
    "class-weighting": (lambda x, w, t: ((x, w, t), {"class_weighting": "bogus"}), ValueError, "class_weighting"),
    "focal-smoothing": (lambda x, w, t: ((x, w, t), {"gamma": 2.0, "label_smoothing": 0.1}), ValueError,
                        "linear_cross_entropy: gamma"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_argument(case):
    make, error, message = BAD[case]
    x, w, t = torch.randn(5, 4), torch.randn(7, 4), torch.randint(0, 7, (5,))
    args, kwargs = make(x, w, t)
    with pytest.raises(error, match=message):
        fused_wloss.linear_cross_entropy(*args, **kwargs)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_out_of_range_target_is_an_error(chunk_size):
    """An IndexError that names this function and the target's own position, not a row of the
    chunk that met it."""
    x, w = torch.randn(5, 4), torch.randn(7, 4)
    with pytest.raises(IndexError, match=r"^linear_cross_entropy: target must hold class indices in \[0, 7\) or "
                                         r"ignore_index=-100, found 7 at element 3$"):
        fused_wloss.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 7, 3]), chunk_size=chunk_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put one argument elsewhere")
def test_device_mismatch_names_the_argument():
    x, w, t = torch.randn(5, 4), torch.randn(7, 4, device="cuda"), torch.randint(0, 7, (5,))
    with pytest.raises(ValueError, match="linear_weight must be on the input's device"):
        fused_wloss.linear_cross_entropy(x, w, t)


# ---- memory --------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, sys, torch
    import fused_wloss
    N, H, C = 2048, 64, 8192
    chunk = json.loads(sys.argv[1])
    chunk = tuple(chunk) if isinstance(chunk, list) else chunk
    block = chunk[0] * chunk[1] if isinstance(chunk, tuple) else chunk * C

    def status_kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    torch.manual_seed(0)
    x = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(C, H) / 8).requires_grad_(True)
    t = torch.randint(0, C, (N,))
    def run():
        loss = fused_wloss.linear_cross_entropy(x, w, t, class_weighting="inverse", chunk_size=chunk)
        return torch.autograd.grad(loss, (x, w))
    run()  # warm up (first-call allocations of the dispatcher, BLAS and the thread pool)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark
    before = status_kb("VmRSS")
    grads = run()
    peak = (status_kb("VmHWM") - before) * 1024
    print(json.dumps({"peak": peak, "grads": x.numel() * 4 + w.numel() * 4, "logits": N * C * 4,
                      "chunk": block * 4}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
@pytest.mark.parametrize("chunk", [256, [1024, 2048]], ids=["rows", "class-tiles"])
def test_peak_memory_is_a_few_chunks_not_the_logits(chunk):
    """In a fresh process: forward+backward of a 2048 x 8192 head (64 MiB of float32 logits) in
    chunks of 256 rows, or in blocks of 1024 rows by 2048 classes (8 MiB either way), raises the
    resident high-water mark, above its inputs and the gradients it returns, by one chunk (the
    chunk's gradient is written over its logits; every byte counted, inside torch's allocator or
    not), well under one logits tensor."""
    # a fixed mmap threshold: every large block is mapped on allocation and unmapped on free, so the
    # resident size follows the live memory (glibc's adaptive threshold would keep freed blocks)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(chunk)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    above = m["peak"] - m["grads"]
    assert above <= 1.25 * m["chunk"], m
    assert above < m["logits"] / 4, m
