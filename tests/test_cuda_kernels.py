"""The CUDA kernels (csrc/cuda) against the reference and torch, on two devices:

- ``emu``: the kernels' own source compiled under the emulation layer (csrc/emu) into the test-only
  module ``fused_wloss._cuda_emu`` and run on CPU tensors, with the launch configuration the GPU
  uses. This is how CI, which has no GPU, executes them. It checks logic (indexing, reductions,
  synchronisation order, math), not speed or the GPU's memory model.
- ``cuda``: the real kernels on a GPU; skipped without one, unless ``FUSED_WLOSS_REQUIRE_CUDA=1``
  (the CUDA lane) turns a missing GPU into a failure.

The emulated module is built by ``make setup`` (``FUSED_WLOSS_BUILD_EMU=1``); ``make test`` sets
``FUSED_WLOSS_REQUIRE_EMU=1`` so that a missing module fails instead of skipping.

Shapes reach every mapping of csrc/cuda/kernels.cuh: groups of 1 to 32 lanes per row (C from 1 to
4096), several rows per block, a block per row (C > 4096) with several warps, K-dim rows with the
classes at stride P, rows whose start is not 16-byte aligned (scalar heads), vector bodies and
scalar tails, and several blocks of partial sums.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import BatchWeighting, ops, reference

from helpers import (assert_close, classes_last, emulation_namespace, gpu_calls, gpu_device, gpu_param, requires_real_gpu,
                     skip_without_gpu, value_and_grad)
from samples import bce_samples, cross_entropy_samples

REQUIRE_EMU = os.environ.get("FUSED_WLOSS_REQUIRE_EMU") == "1"


EMU_NS = emulation_namespace()


class KernelDevice:
    """Where the tensors of a test live and how calls reach the CUDA kernels (``cuda``: on CPU
    tensors through the emulated kernels in the CUDA lane's dry run, see helpers.LANE_EMULATED)."""

    def __init__(self, name: str):
        self.name = name
        self.device = gpu_device() if name == "cuda" else "cpu"

    def calls(self):
        if self.name == "emu":
            return ops.use_namespace(EMU_NS)
        return gpu_calls()

    def __repr__(self):
        return self.name


@pytest.fixture(params=["emu", gpu_param()])
def dev(request):
    if request.param == "emu" and EMU_NS is None:
        reason = "the emulated CUDA kernels (fused_wloss._cuda_emu) are not built: run `make setup`"
        if REQUIRE_EMU:
            pytest.fail(reason + " (FUSED_WLOSS_REQUIRE_EMU=1)")
        pytest.skip(reason)
    if request.param == "cuda":
        skip_without_gpu()
    return KernelDevice(request.param)


def _index_samples(samples):
    # probability targets never reach the kernels (fused_wloss sends them to the reference)
    return [s for s in samples if "-prob-" not in s.name]


CE_SAMPLES = _index_samples(cross_entropy_samples(dtype=torch.float64))
BCE_SAMPLES = list(bce_samples(dtype=torch.float64))


def _compare(dev, fn, fn_ref, torch_fn, sample, dtype=torch.float64):
    sample = sample.clone()
    moved = type(sample)(sample.name, tuple(a.to(dev.device) if isinstance(a, torch.Tensor) else a for a in sample.args),
                         {k: v.to(dev.device) if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()},
                         sample.torch_ok)
    with dev.calls():
        out, grad = value_and_grad(fn, moved)
    ref_out, ref_grad = value_and_grad(fn_ref, sample)
    assert_close(out.cpu(), ref_out, dtype, f"{sample.name} value vs reference")
    assert_close(grad.cpu(), ref_grad, dtype, f"{sample.name} gradient vs reference")
    if sample.torch_ok:
        t_out, t_grad = value_and_grad(torch_fn, sample)
        assert_close(out.cpu(), t_out, dtype, f"{sample.name} value vs torch")
        assert_close(grad.cpu(), t_grad, dtype, f"{sample.name} gradient vs torch")


@pytest.mark.parametrize("sample", CE_SAMPLES, ids=lambda s: s.name)
def test_cross_entropy_samples(dev, sample):
    _compare(dev, fused_wloss.cross_entropy, reference.cross_entropy, F.cross_entropy, sample)


@pytest.mark.parametrize("sample", BCE_SAMPLES, ids=lambda s: s.name)
def test_bce_samples(dev, sample):
    _compare(dev, fused_wloss.binary_cross_entropy_with_logits, reference.binary_cross_entropy_with_logits,
             F.binary_cross_entropy_with_logits, sample)


# ---- every mapping of the CE kernels ------------------------------------------------------------

CE_MAPPINGS = {
    "c1-group1": (37, 1),
    "c3-group1": (300, 3),  # 256 rows a block: two blocks
    "c10-group2": (70, 10),
    "c33-group8": (40, 33),  # odd C: most rows start unaligned (scalar head) and end in a tail
    "c130-group32": (9, 130),
    "c4096-warp": (3, 4096),
    "c4097-block": (3, 4097),  # a block per row: warps combine through shared memory
    "c9000-block": (2, 9000),
    # few rows of many classes: a row cut into slices of 8192+ classes, a block each (ce_slices in losses_host.h)
    "split-2": (3, 16400),
    "split-4-one-row": (1, 40000),
    "split-7-odd": (2, 57345),  # odd C: the second row misaligned, a head in slice 0 and a tail in the last
    # K-dim with few pixels: the classes of a block's pixels cut into slices of 128+ (ce_slices)
    "kdim-split-2": (2, 300, 50),
    "kdim-split-7": (3, 1000, 37),  # 111 pixels: a partial block, 7 slices of 143 and a last of 142
    # K-dim on the (pixel blocks, images) grid (ce_launch): a thread per pixel, or per 16-byte vector
    # of pixels where P and the logits allow it; the emulation's grid has 3 rows, so 5 images walk past it
    "kdim-p37": (5, 6, 37),  # a thread per pixel, a block of 64 threads with 27 idle
    "kdim-3d": (2, 3, 4, 70),  # 280 pixels: a vector of 2 float64 pixels a thread, else one
    "kdim-p256": (5, 7, 256),  # a vector of pixels a thread in every dtype (aligned)
    # K-dim with fewer pixels than a warp: flat over the rows, a thread per pixel
    "kdim-p5-flat": (70, 4, 5),
}

CE_OPTIONS = {
    "plain": {},
    "everything": {"weight": True, "label_smoothing": 0.1, "sample_weight": True, "ignore": True,
                   "class_weighting": BatchWeighting("effective_number", beta=0.99)},
    "smooth-inverse-sum": {"label_smoothing": 0.2, "class_weighting": "inverse", "reduction": "sum", "ignore": True},
    "none-sample-mean": {"weight": True, "reduction": "none", "sample_weight": True},
}


def _ce_call(shape, options, dtype, device, seed=0, offset=0):
    """Inputs for a CE call; `offset` elements of padding before the logits misalign every row."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[1] if len(shape) > 1 else shape[0]
    flat = torch.randn(offset + int(torch.tensor(shape).prod()), generator=gen, dtype=torch.float64) * 3
    x = flat[offset:].view(shape).to(dtype)
    if offset:
        x = torch.empty(offset + x.numel(), dtype=dtype, device=device)[offset:].view(shape).copy_(x)
    else:
        x = x.to(device)
    tshape = shape[:1] + shape[2:]
    t = torch.randint(0, C, tshape, generator=gen)
    kw = {"reduction": options.get("reduction", "mean")}
    if options.get("ignore"):
        t = torch.where(torch.rand(tshape, generator=gen) < 0.2, torch.full_like(t, -100), t)
    if options.get("weight"):
        kw["weight"] = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.1).to(dtype).to(device)
    if options.get("sample_weight"):
        kw["sample_weight"] = (torch.rand(tshape, generator=gen, dtype=torch.float64) + 0.1).to(dtype).to(device)
    for k in ("label_smoothing", "class_weighting"):
        if k in options:
            kw[k] = options[k]
    return x, t.to(device), kw


def _run(dev, fn, x, t, kw, seed=5):
    x = x.detach().clone().requires_grad_(True)
    with dev.calls():
        out = fn(x, t, **kw)
        gen = torch.Generator().manual_seed(seed)
        g = (torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype).to(out.device)
        (grad,) = torch.autograd.grad(out, x, g)
    return out.detach(), grad


def _to_cpu64(kw):
    return {k: v.detach().cpu().double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.mark.parametrize("options", list(CE_OPTIONS), ids=str)
@pytest.mark.parametrize("mapping", list(CE_MAPPINGS), ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
def test_cross_entropy_mappings_float64(dev, mapping, options, offset):
    shape = CE_MAPPINGS[mapping]
    x, t, kw = _ce_call(shape, CE_OPTIONS[options], torch.float64, dev.device, offset=offset)
    out, grad = _run(dev, fused_wloss.cross_entropy, x, t, kw)
    ref_out, ref_grad = _run(KernelDevice("ref"), reference.cross_entropy, x.cpu(), t.cpu(), _to_cpu64(kw))
    assert_close(out.cpu(), ref_out, torch.float64, "value")
    assert_close(grad.cpu(), ref_grad, torch.float64, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", ["plain", "everything"])
@pytest.mark.parametrize("mapping", ["c10-group2", "c33-group8", "c4097-block", "kdim-p37"])
def test_cross_entropy_low_precision_within_twice_torch(dev, dtype, options, mapping):
    """Error against a float64 reference at most twice torch's own error at the same precision
    (fp16/bf16: fp32 accumulation; the true-class gradient in fp32)."""
    shape = CE_MAPPINGS[mapping]
    opts = {k: v for k, v in CE_OPTIONS[options].items() if k != "class_weighting"}
    x, t, kw = _ce_call(shape, opts, dtype, dev.device, offset=1)
    out, grad = _run(dev, fused_wloss.cross_entropy, x, t, kw)
    x64, kw64 = x.detach().cpu().double(), _to_cpu64(kw)
    ref_out, ref_grad = _run(KernelDevice("ref"), reference.cross_entropy, x64, t.cpu(), kw64)
    sw = kw.pop("sample_weight", None)
    def torch_fn(x_, t_, **k):
        red = k.pop("reduction")
        if sw is None:
            return F.cross_entropy(x_, t_, reduction=red, **k)
        loss = F.cross_entropy(x_, t_, reduction="none", **k) * sw.cpu()
        return loss if red == "none" else loss.sum()
    if sw is not None and kw["reduction"] == "mean":
        pytest.skip("torch has no sample-weighted mean to compare with")
    t_out, t_grad = _run(KernelDevice("ref"), torch_fn, x.detach().cpu(), t.cpu(), {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    for ours, theirs, exact in ((out, t_out, ref_out), (grad, t_grad, ref_grad)):
        our_err = (ours.cpu().double() - exact).abs().max().item()
        torch_err = (theirs.double() - exact).abs().max().item()
        eps = torch.finfo(dtype).eps * max(1.0, exact.abs().max().item()) * 0.5
        assert our_err <= 2 * torch_err + eps, f"error {our_err:.3g} vs torch's {torch_err:.3g}"


@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (4, 5, 0), (2, 0)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_inputs(dev, shape, reduction):
    x = torch.zeros(shape, device=dev.device, requires_grad=True)
    C = shape[1]
    t = torch.full(shape[:1] + shape[2:], -100, dtype=torch.long, device=dev.device)
    if C > 0:
        t.zero_()
    with dev.calls():
        out = fused_wloss.cross_entropy(x, t, reduction=reduction, class_weighting="inverse")
        out.sum().backward()
    expected = reference.cross_entropy(x.detach().cpu(), t.cpu(), reduction=reduction, class_weighting="inverse")
    torch.testing.assert_close(out.detach().cpu(), expected, equal_nan=True)
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("reduction", [0, 1, 2, 3], ids=["none", "sum", "mean", "sample_mean"])
@pytest.mark.parametrize("weights", ["none", "static", "dynamic", "both"])
@pytest.mark.parametrize("shape", [(300, 3), (3, 4100), (3, 6, 5)], ids=str)
def test_forward_operator_outputs(dev, shape, weights, reduction):
    """The forward operator's four outputs (loss, lse, class weights, normaliser) against the CPU
    kernels': "none" sets the normaliser without the finalize kernel, and class weights without a
    static weight are written, not read."""
    gen = torch.Generator().manual_seed(9)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.randint(0, C, shape[:1] + shape[2:], generator=gen)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5 if weights in ("static", "both") else None
    scheme = 1 if weights in ("dynamic", "both") else 0
    args = (None, -100, 0.1, reduction, scheme, 1.0, 0.999)
    ns = EMU_NS if dev.name == "emu" else "fused_wloss"
    got = getattr(torch.ops, ns).cross_entropy_forward(x.to(dev.device), t.to(dev.device), None if w is None else w.to(dev.device), *args)
    want = torch.ops.fused_wloss.cross_entropy_forward(x, t, w, *args)
    for g, e, name in zip(got, want, ("loss", "lse", "class weights", "normaliser")):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")
    if reduction == 0:
        assert got[3].item() == 1.0


@pytest.mark.parametrize("options", ["plain", "everything", "none-sample-mean"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mapping", ["kdim-p37", "kdim-p256", "kdim-p5-flat"])
def test_kdim_pixel_paths(dev, mapping, dtype, offset, options):
    """The K-dim mappings in every kernel dtype, aligned (a 16-byte vector of pixels a thread where
    P allows: 4 float32 or 8 half pixels) and misaligned (a pixel a thread), against the float64
    reference on the same rounded inputs."""
    shape = CE_MAPPINGS[mapping]
    x, t, kw = _ce_call(shape, CE_OPTIONS[options], dtype, dev.device, offset=offset)
    out, grad = _run(dev, fused_wloss.cross_entropy, x, t, kw)
    ref_out, ref_grad = _run(KernelDevice("ref"), reference.cross_entropy, x.detach().cpu().double(), t.cpu(),
                             _to_cpu64(kw))
    assert_close(out.cpu().double(), ref_out, dtype, "value")
    assert_close(grad.cpu().double(), ref_grad, dtype, "gradient")


@pytest.mark.parametrize("shape", [(4, 10), (4, 33), (3, 4100), (3, 6, 5)], ids=str)
def test_nan_and_inf_logits_as_torch(dev, shape):
    """A NaN anywhere in a row makes its loss NaN, wherever it falls in the row's split over
    threads (first chunk, scalar head, another warp, K-dim); +-inf logits behave as in torch."""
    x = torch.randn(shape, dtype=torch.float64)
    x[0][:8] = float("nan")  # row 0 (pixel row 0 for K-dim): NaN at the first classes
    x[1][-1] = float("nan")  # row 1: NaN at the last class
    x[2][0] = float("-inf")  # row 2: a -inf logit (finite loss unless it is the target)
    t = torch.full(shape[:1] + shape[2:], 1, dtype=torch.long)
    on = {"device": dev.device}
    with dev.calls():
        ours = fused_wloss.cross_entropy(x.to(**on), t.to(**on), reduction="none")
    theirs = F.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(ours.cpu(), theirs, equal_nan=True)


@pytest.mark.parametrize("shape", [(4, 10), (4, 33), (3, 4100), (3, 6, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gradient_of_logits_beyond_1e15(dev, dtype, shape):
    """Rows of logits 1e30 and 1e29 in every thread mapping: the gradient shares each row equally
    among its 1e30 classes, as torch's; the saved lse keeps log(sum) in its low part (see the CPU
    test of the same name in test_hostile.py)."""
    x = torch.full(shape, 1e30, dtype=dtype)
    x[:, 1::3] = 1e29
    t = torch.arange(shape[0] * math.prod(shape[2:])).reshape(shape[:1] + shape[2:]) % shape[1]
    on = {"device": dev.device}
    xd = x.to(**on).requires_grad_()
    with dev.calls():
        (ours,) = torch.autograd.grad(fused_wloss.cross_entropy(xd, t.to(**on)), xd)
    xr = x.clone().requires_grad_()
    (theirs,) = torch.autograd.grad(F.cross_entropy(xr, t), xr)
    torch.testing.assert_close(ours.cpu(), theirs)


@pytest.mark.parametrize("ignore_index", [0, 3])
def test_int32_targets_and_ignore_index_inside_the_classes(dev, ignore_index):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(50, 7, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 7, (50,), generator=gen)
    kw = {"ignore_index": ignore_index, "class_weighting": "inverse", "label_smoothing": 0.1}
    out, grad = _run(dev, fused_wloss.cross_entropy, x.to(dev.device), t.int().to(dev.device), kw)
    ref_out, ref_grad = _run(KernelDevice("ref"), reference.cross_entropy, x, t, kw)
    assert_close(out.cpu(), ref_out, torch.float64, "value")
    assert_close(grad.cpu(), ref_grad, torch.float64, "gradient")


def test_noncontiguous_inputs(dev):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 70, generator=gen, dtype=torch.float64)
    x = base[::2, 1:60:2].to(dev.device)  # strided both ways
    t = torch.randint(0, x.shape[1], (x.shape[0],), generator=gen).to(dev.device)
    w = torch.rand(x.shape[1], generator=gen, dtype=torch.float64).to(dev.device)
    out, grad = _run(dev, fused_wloss.cross_entropy, x, t, {"weight": w, "label_smoothing": 0.1})
    ref_out, ref_grad = _run(KernelDevice("ref"), reference.cross_entropy, x.cpu(), t.cpu(),
                             {"weight": w.cpu(), "label_smoothing": 0.1})
    assert_close(out.cpu(), ref_out, torch.float64, "value")
    assert_close(grad.cpu(), ref_grad, torch.float64, "gradient")


@pytest.mark.parametrize("shape", [(300, 3), (40, 33), (3, 4097), (2, 3, 4, 70), (5, 7, 256), (2, 57345), (3, 1000, 37)],
                         ids=str)
def test_bitwise_repeatable(dev, shape):
    x, t, kw = _ce_call(shape, CE_OPTIONS["everything"], torch.float32, dev.device)
    first = _run(dev, fused_wloss.cross_entropy, x, t, kw)
    for _ in range(2):
        again = _run(dev, fused_wloss.cross_entropy, x, t, kw)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("shape", [(1000, 10), (7, 3, 33), (5000,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bce_blocks_and_dtypes(dev, shape, dtype):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype)
    t = (torch.rand(shape, generator=gen) < 0.2).to(dtype)
    L = shape[-1]
    kw = {"pos_weight": (torch.rand(L, generator=gen) + 0.5).to(dtype), "class_weighting": BatchWeighting("inverse", balanced=True)}
    on_dev = {k: v.to(dev.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out, grad = _run(dev, fused_wloss.binary_cross_entropy_with_logits, x.to(dev.device), t.to(dev.device), on_dev)
    ref_out, ref_grad = _run(KernelDevice("ref"), reference.binary_cross_entropy_with_logits, x.double(), t.double(), _to_cpu64(kw))
    tol = {torch.float32: (1e-5, 1e-7), torch.bfloat16: (2e-2, 1e-3)}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("options", ["plain", "everything"])
@pytest.mark.parametrize("shape", [(3, 7, 5, 6), (2, 4100, 3, 2), (2, 4, 3, 5, 2), (5, 33, 17)], ids=str)
def test_classes_last_logits_are_read_in_place(dev, shape, options):
    """channels_last and other classes-innermost K-dim logits go through the row kernels (a group
    per row, or a block per row past 4096 classes) without a contiguous copy; the gradient keeps
    their layout."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = classes_last(shape, gen, scale=3)
    _, t, kw = _ce_call(shape, CE_OPTIONS[options], torch.float64, "cpu")
    on_dev = {k: v.to(dev.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    xd = x.to(dev.device)
    assert xd.stride() == x.stride()
    xd.requires_grad_(True)
    with dev.calls():
        out = fused_wloss.cross_entropy(xd, t.to(dev.device), **on_dev)
        (grad,) = torch.autograd.grad(out.sum(), xd)
    xr = x.contiguous().requires_grad_(True)
    ref = reference.cross_entropy(xr, t, **_to_cpu64(kw))
    (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
    assert_close(out.detach().cpu(), ref.detach(), torch.float64, "value")
    assert_close(grad.cpu(), ref_grad, torch.float64, "gradient")
    assert grad.stride() == x.stride()


# ---- the BCE kernels' vector and label paths ----------------------------------------------------

# (rows, L) layouts that move the (row, label) cursor of a 16-byte vector every way: one label, fewer
# labels than a vector (a vector spans rows), labels that do not divide it, more labels than the
# label-sum block has threads, and a total that ends in a partial vector. Forward blocks hold 4096
# elements, so every layout but the last takes several blocks, each thread several vectors.
BCE_LAYOUTS = {"L1": (6000, 1), "L3": (2100, 3), "L5": (1000, 5), "L8": (700, 8), "L33": (150, 33),
               "L300": (20, 300), "L1001-tail": (7, 1001)}
BCE_WEIGHTS = {
    # per-label weight and pos_weight, per-row sample weights (the dynamic weights' label sums:
    # test_bce_label_sums_over_rows, whose 1024-block launches are slow to emulate)
    "labels": lambda rows, L, gen: {"weight": torch.rand(L, generator=gen) + 0.5, "pos_weight": torch.rand(L, generator=gen) + 0.5,
                                    "sample_weight": torch.rand(rows, generator=gen) + 0.5},
    # a weight per element (no cursor), focal
    "elements": lambda rows, L, gen: {"weight": torch.rand(rows, L, generator=gen) + 0.5, "gamma": 2.0, "alpha": 0.25},
}


def _misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t as a view `offset` elements into a buffer: off the 16-byte boundary for offset 1."""
    if not offset:
        return t
    return torch.zeros(t.numel() + offset, dtype=t.dtype, device=t.device)[offset:].view(t.shape).copy_(t)


@pytest.mark.parametrize("layout", ["L1", "L3", "L33", "L300"])
def test_bce_label_sums_over_rows(dev, layout):
    """The label sums behind dynamic weights: groups of threads over the rows for few labels (one
    label: every thread of a block), a thread per label for many; balanced weights use both sums."""
    rows, L = BCE_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(rows + L)
    x = torch.randn(rows, L, generator=gen) * 4
    t = (torch.rand(rows, L, generator=gen) < torch.linspace(0.05, 0.6, L)).float()
    kw = {"class_weighting": BatchWeighting("inverse", balanced=True), "pos_weight": torch.rand(L, generator=gen) + 0.5}
    with dev.calls():
        out, grad = _run(dev, fused_wloss.binary_cross_entropy_with_logits, x.to(dev.device), t.to(dev.device),
                         {k: v.to(dev.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    ref_out, ref_grad = _run(KernelDevice("ref"), reference.binary_cross_entropy_with_logits, x.double(), t.double(),
                             _to_cpu64(kw))
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weights", list(BCE_WEIGHTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(BCE_LAYOUTS))
def test_bce_vector_and_label_paths(dev, layout, dtype, weights, reduction, offset):
    """Vectors of 2, 4 or 8 elements (float64, float32, bfloat16 with float32 targets) where the
    logits and targets are aligned, element by element where they are not, against the reference."""
    rows, L = BCE_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(rows * 7 + L)
    x64 = torch.randn(rows, L, generator=gen, dtype=torch.float64) * 4
    t32 = (torch.rand(rows, L, generator=gen) < torch.linspace(0.05, 0.6, L)).float()
    kw = BCE_WEIGHTS[weights](rows, L, gen)
    x = x64.to(dtype)
    t = t32 if dtype == torch.bfloat16 else t32.to(dtype)  # float32 targets with half logits: two loads a vector
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    kw["reduction"] = reduction
    base = torch.zeros(x.numel() + offset, dtype=dtype, device=dev.device)
    base[offset:].copy_(x.flatten())
    base.requires_grad_(True)
    xd = base[offset:].view(rows, L)
    td = _misaligned(t.to(dev.device), offset)
    on_dev = {k: v.to(dev.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with dev.calls():
        out = fused_wloss.binary_cross_entropy_with_logits(xd, td, **on_dev)
        g = (torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype).to(out.device)
        (grad,) = torch.autograd.grad(out, base, g)
    xr = x.double().requires_grad_(True)
    ref = reference.binary_cross_entropy_with_logits(xr, t.double(), **_to_cpu64(kw))
    (ref_grad,) = torch.autograd.grad(ref, xr, g.cpu().double())
    tol = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-7), torch.bfloat16: (2e-2, 1e-3)}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref.detach(), rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(grad[offset:].cpu().double().view(rows, L), ref_grad, rtol=tol[0], atol=tol[1])
    with dev.calls():  # bitwise repeatable
        again = fused_wloss.binary_cross_entropy_with_logits(xd, td, **on_dev)
    assert torch.equal(out, again.detach())


def test_target_out_of_range_is_a_device_assert():
    """On a GPU the same check is a device-side assert (not tested there: it poisons the CUDA
    context for the rest of the process)."""
    if EMU_NS is None:
        pytest.skip("the emulated CUDA kernels are not built")
    dev = KernelDevice("emu")
    x = torch.randn(6, 5, device=dev.device)
    t = torch.tensor([0, 1, 5, 2, 3, 4], device=dev.device)
    with dev.calls(), pytest.raises(RuntimeError, match="target out of range"):
        torch.ops.fused_wloss_emu.cross_entropy_forward(x, t, None, None, -100, 0.0, 2, 0, 1.0, 0.999)
    with dev.calls(), pytest.raises(RuntimeError, match="target out of range"):
        torch.ops.fused_wloss_emu.cross_entropy_forward(x, t - 7, None, None, -100, 0.0, 2, 1, 1.0, 0.999)
    # the backward checks too: grouped rows, and a block per row (where one thread forms the row's prologue)
    for C in (5, 4097):
        x = torch.randn(2, C, device=dev.device)
        good = torch.tensor([0, C - 1], device=dev.device)
        with dev.calls():
            loss, lse, cw, norm = torch.ops.fused_wloss_emu.cross_entropy_forward(x, good, None, None, -100, 0.0, 2, 0,
                                                                                 1.0, 0.999)
        with dev.calls(), pytest.raises(RuntimeError, match="target out of range"):
            torch.ops.fused_wloss_emu.cross_entropy_backward(torch.ones(()), x, good + 1, cw, None, lse, norm, -100,
                                                             0.0, 2, 0.0)


def test_emulated_and_cpu_kernels_agree():
    """The two implementations of the same operators, on the same inputs, to float32 rounding."""
    if EMU_NS is None:
        pytest.skip("the emulated CUDA kernels are not built")
    dev = KernelDevice("emu")
    x, t, kw = _ce_call((64, 130), CE_OPTIONS["everything"], torch.float32, "cpu")
    ours = _run(dev, fused_wloss.cross_entropy, x, t, kw)
    cpu = _run(KernelDevice("cpu"), fused_wloss.cross_entropy, x, t, kw)
    for a, b in zip(ours, cpu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- GPU only --------------------------------------------------------------------------------

@pytest.fixture
def gpu():
    requires_real_gpu()
    return KernelDevice("cuda")


# CUDA-graph capture and replay (on new data): tests/test_gpu_proof.py


@pytest.mark.gpu
def test_compile_reduce_overhead(gpu):
    x, t, _ = _ce_call((128, 100), {}, torch.float32, "cuda")

    def step(x, t):
        return fused_wloss.cross_entropy(x, t, class_weighting="inverse")

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        xg = x.detach().clone().requires_grad_(True)
        out = compiled(xg, t)
        out.backward()
    xr = x.detach().clone().requires_grad_(True)
    expected = reference.cross_entropy(xr, t, class_weighting="inverse")
    expected.backward()
    torch.testing.assert_close(out.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-7)


def test_emulated_results_file_is_current():
    """tests/data/emulated_results.pt, which the GPU compares its float64 results against
    (test_gpu_proof.py), holds what the emulated kernels compute now."""
    from test_gpu_proof import _emulated_results_are_current

    _emulated_results_are_current()
