"""Cross-entropy with probability (soft) targets on the kernels: mixup, CutMix, distillation.

``cross_entropy_prob_forward`` / ``_backward`` (csrc/cpu/ce_prob.h, the CUDA kernels in
csrc/cuda/kernels.cuh) against the reference and torch: every layout (rows with and without a
partial last vector, K-dim, unbatched), every option, every reduction, every dtype and
instruction-set build, the emulated CUDA kernels; float32 targets with half-precision logits;
opcheck, gradcheck, torch.compile, bitwise repeatability, and hostile targets (negative, NaN, rows
that do not sum to 1) drawn by hypothesis.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import fused_wloss
from fused_wloss import BatchWeighting, ops, reference

from fuzzing import fuzz_settings
from helpers import kernel_paths, on_device, path_params, serve, value_and_grad
from samples import Sample

pytestmark = pytest.mark.skipif(fused_wloss.backend("cpu") != "extension", reason="compiled CPU kernels not loaded")


PATHS = path_params(kernel_paths(gpu=True))


SHAPES = {
    "unbatched": (7,),
    "tiny-c": (37, 3),
    "small-c": (33, 10),
    "rows-tail": (9, 45),
    "rows": (70, 300),
    "rows-wide": (4, 1000),
    # a block per row on CUDA; 9 rows walk past the emulation's 4-block grid and take the block-per-row
    # backward there (fewer than 4 rows, or fewer than 264 on a GPU, the flat one)
    "rows-block": (9, 4100),
    "rows-block-few": (3, 4100),
    "kdim": (4, 5, 3, 7),
    "kdim-wide": (2, 40, 21),
    # on CUDA the pixel grid (40 pixels: 64-thread blocks); 5 images walk past the emulation's 3 grid rows
    "kdim-pixels": (5, 6, 40),
}
OPTIONS = {
    "plain": {},
    "weight": {"weight": "class"},
    "smoothing": {"label_smoothing": 0.2},
    "weight_smoothing": {"weight": "class", "label_smoothing": 0.1},
    "sample_weight": {"sample_weight": "sample"},
    "inverse": {"class_weighting": "inverse"},
    "everything": {"weight": "class", "label_smoothing": 0.15, "sample_weight": "sample",
                   "class_weighting": BatchWeighting("effective_number", beta=0.9)},
}
REDUCTIONS = ["none", "sum", "mean", "sample_mean"]
TORCH_OPTIONS = ("weight", "label_smoothing", "reduction")


def _case(shape, options, dtype, target_dtype=None, seed=0, kind="soft"):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    C = shape[0] if len(shape) == 1 else shape[1]
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    q = torch.softmax(logits, dim=0 if len(shape) == 1 else 1)
    if kind == "mixup":  # two one-hot rows mixed, as mixup makes them
        idx = logits.argmax(dim=0 if len(shape) == 1 else 1, keepdim=True)
        q = torch.zeros_like(q).scatter_(0 if len(shape) == 1 else 1, idx, 0.7) + 0.3 / C
    q = q.to(target_dtype or dtype)
    loss_shape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    kw = {}
    for k, v in options.items():
        if v == "class":
            v = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        elif v == "sample":
            v = (torch.rand(loss_shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        kw[k] = v
    return x, q, kw


def _exact(x, q, kw):
    """The reference in float64: value and gradient."""
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return value_and_grad(reference.cross_entropy, Sample("exact", (x.double(), q.double()), kw64, False))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_float64_matches_reference(path, shape, options, reduction):
    x, q, kw = _case(SHAPES[shape], OPTIONS[options], torch.float64)
    kw["reduction"] = reduction
    assert ops.ce_supported(x, q, kw.get("weight"), kw.get("sample_weight"), True)
    with serve(path):
        x, q, kw = on_device(path, x, q, kw)
        loss, grad = value_and_grad(fused_wloss.cross_entropy, Sample("ours", (x, q), kw, False))
    exp_loss, exp_grad = _exact(x, q, kw)
    torch.testing.assert_close(loss, exp_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, exp_grad, rtol=1e-10, atol=1e-12)
    if set(kw) <= set(TORCH_OPTIONS) and reduction != "sample_mean":
        theirs = value_and_grad(F.cross_entropy, Sample("torch", (x, q), kw, True))
        torch.testing.assert_close(loss, theirs[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, theirs[1], rtol=1e-10, atol=1e-12)


def _max_err(got, exact):
    return max(((g.double() - e).abs().max().item() if g.numel() else 0.0) for g, e in zip(got, exact))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, target_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
                         ids=["f32", "bf16", "f16", "bf16-f32-targets", "f16-f32-targets"])
@pytest.mark.parametrize("options", ["plain", "weight_smoothing", "everything"])
@pytest.mark.parametrize("shape", ["small-c", "rows", "kdim-wide"])
def test_low_precision_within_twice_torch(path, dtype, target_dtype, options, shape):
    """The error against the float64 reference is at most twice torch's own at that precision (the
    reference stands in for torch where torch lacks an option)."""
    x, q, kw = _case(SHAPES[shape], OPTIONS[options], dtype, target_dtype, kind="mixup")
    kw["reduction"] = "none"
    with serve(path):
        x, q, kw = on_device(path, x, q, kw)
        ours = value_and_grad(fused_wloss.cross_entropy, Sample("ours", (x, q), kw, False))
    assert ours[0].dtype == (torch.float32 if target_dtype else dtype) or ours[0].dtype == dtype
    assert ours[1].dtype == dtype
    exact = _exact(x, q, kw)
    torch_fn = F.cross_entropy if set(kw) <= set(TORCH_OPTIONS) else reference.cross_entropy
    theirs = value_and_grad(torch_fn, Sample("theirs", (x, q.to(dtype)), kw, True))
    floor = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    assert _max_err(ours, exact) <= 2 * _max_err(theirs, exact) + floor


def _classes_last(t):
    """t with the same values, laid out with its classes (dim 1) innermost in memory."""
    order = (0, *range(2, t.dim()), 1)
    back = [order.index(d) for d in range(t.dim())]
    return t.permute(order).contiguous().permute(back)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("targets", ["classes-last", "contiguous"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("options", ["plain", "everything"])
@pytest.mark.parametrize("shape", [(3, 7, 5, 6), (2, 40, 9, 30), (2, 4, 3, 5, 2)], ids=str)
def test_classes_last_logits_are_read_in_place(path, shape, options, reduction, targets):
    """channels_last, channels_last_3d and any classes-innermost logits: the kernels read them as
    rows of classes with no copy, the targets as rows in the same order (in place when they are
    classes-last too, else permuted), and the gradient comes back in the logits' own layout, as the
    backward's fake kernel lays it out."""
    x, q, kw = _case(shape, OPTIONS[options], torch.float64, seed=sum(shape))
    kw["reduction"] = reduction
    x_cl = _classes_last(x)
    q_in = _classes_last(q) if targets == "classes-last" else q
    assert not x_cl.is_contiguous() and torch.equal(x_cl, x)
    with serve(path):
        xd, qd, kwd = on_device(path, x_cl, q_in, kw)
        assert xd.stride() == x_cl.stride()
        loss, grad = value_and_grad(fused_wloss.cross_entropy, Sample("ours", (xd, qd), kwd, False))
    exp_loss, exp_grad = _exact(x, q, kw)
    torch.testing.assert_close(loss.cpu(), exp_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad.cpu(), exp_grad, rtol=1e-10, atol=1e-12)
    assert grad.stride() == x_cl.stride(), (grad.stride(), x_cl.stride())
    assert ops.ce_grad_like(x_cl).stride() == x_cl.stride()


@pytest.mark.parametrize("path", PATHS)
def test_float32_targets_are_read_as_they_are(path):
    """float32 targets with bfloat16 logits: the kernels read them unrounded (a bfloat16 copy of
    these targets would move the loss by far more than float32 rounding)."""
    x, q, _ = _case((16, 50), {}, torch.bfloat16, torch.float32)
    with serve(path):
        x, q = on_device(path, x, q)
        loss = fused_wloss.cross_entropy(x, q, reduction="none")
    exact = reference.cross_entropy(x.double(), q.double(), reduction="none")
    rounded = reference.cross_entropy(x.double(), q.to(torch.bfloat16).double(), reduction="none")
    err, err_rounded = (loss.double() - exact).abs().max(), (rounded - exact).abs().max()
    assert err < err_rounded / 4, (err, err_rounded)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", ["rows", "kdim", "small-c"])
def test_gradcheck(path, shape):
    x, q, kw = _case(SHAPES[shape], OPTIONS["everything"], torch.float64)
    x = x[:3].detach().requires_grad_(True) if shape != "kdim" else x.detach().requires_grad_(True)
    q = q[: x.shape[0]]
    kw["sample_weight"] = kw["sample_weight"][: x.shape[0]]
    with serve(path):
        x, q, kw = on_device(path, x, q, kw)
        x = x.detach().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda v: fused_wloss.cross_entropy(v, q, reduction="sum", **kw), (x,))


def test_opcheck():
    x, q, kw = _case((6, 13), OPTIONS["weight_smoothing"], torch.float32)
    sw = torch.rand(6) + 0.5
    for args in [
        (x, q, kw["weight"], sw, 0.1, 2, 1, 1.0, 0.999),
        (x, q, None, None, 0.0, 0, 0, 1.0, 0.999),
        (x.reshape(3, 2, 13).transpose(1, 2).contiguous(), q.reshape(3, 2, 13).transpose(1, 2).contiguous(),
         None, None, 0.0, 3, 2, 1.0, 0.999),
        # channels_last logits and targets: read in place, the gradient in their layout
        (x.reshape(3, 2, 1, 13).permute(0, 3, 1, 2), q.reshape(3, 2, 1, 13).permute(0, 3, 1, 2),
         None, None, 0.1, 0, 1, 1.0, 0.999),
    ]:
        torch.library.opcheck(torch.ops.fused_wloss.cross_entropy_prob_forward,
                              (args[0].clone().requires_grad_(True),) + args[1:])


def test_compile_fullgraph():
    x, q, kw = _case((32, 20), OPTIONS["everything"], torch.float32)

    def step(x, q):
        return fused_wloss.cross_entropy(x, q, **kw)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = compiled(xc, q)
    out.backward()
    expected = step(xe, q)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("shape", ["rows", "kdim-wide"])
def test_bitwise_repeatable_across_thread_counts(shape):
    x, q, kw = _case((3000, 40) if shape == "rows" else (20, 40, 300), OPTIONS["everything"], torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            loss, grad = value_and_grad(fused_wloss.cross_entropy, Sample("ours", (x, q), kw, False))
            results.append((loss, grad))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_soft_counts_drive_the_dynamic_weights():
    x, q, _ = _case((40, 6), {}, torch.float64)
    _, stats = fused_wloss.cross_entropy(x, q, class_weighting="inverse", return_stats=True)
    torch.testing.assert_close(stats.counts, q.sum(0))
    torch.testing.assert_close(stats.class_weight, 1.0 / (q.sum(0) + 1.0))


def test_wrong_target_shape_and_dtype_are_refused():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="target"):
        fused_wloss.cross_entropy(x, torch.rand(4, 6))
    with pytest.raises(RuntimeError, match="probability targets must have the input's shape"):
        torch.ops.fused_wloss.cross_entropy_prob_forward(x, torch.rand(4, 6), None, None, 0.0, 2, 0, 1.0, 0.999)
    with pytest.raises(RuntimeError, match="probability targets must have the input's dtype"):
        torch.ops.fused_wloss.cross_entropy_prob_forward(x, torch.rand(4, 5, dtype=torch.float64), None, None, 0.0,
                                                         2, 0, 1.0, 0.999)


# ---- hostile targets ------------------------------------------------------------------------------

@st.composite
def hostile_cases(draw):
    # (2, 3, 40): the CUDA pixel grid; (2, 4100): a block per row there
    shape = draw(st.sampled_from([(1, 1), (3, 4), (5, 17), (2, 33), (2, 3, 5), (2, 3, 40), (2, 4100), (7,), (0, 4),
                                  (3, 0)]))
    kind = draw(st.sampled_from(["soft", "negative", "nan", "unnormalised", "one-hot", "zeros"]))
    logits = draw(st.sampled_from(["normal", "huge", "-inf", "nan", "+inf"]))
    options = draw(st.sampled_from(sorted(OPTIONS)))
    reduction = draw(st.sampled_from(REDUCTIONS))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**16))
    path = draw(st.sampled_from(kernel_paths()))  # every CPU build and the emulated CUDA kernels
    return shape, kind, logits, options, reduction, dtype, seed, path


@fuzz_settings(150, HealthCheck.filter_too_much)
@given(case=hostile_cases())
def test_hostile_targets_agree_with_reference(case):
    """Targets the kernels do not validate (torch does not either): negative, NaN, rows that do
    not sum to 1, all zero; and special logits. The kernels equal the reference in value and
    gradient, NaN and inf where it has them."""
    shape, kind, logits, options, reduction, dtype, seed, path = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    q = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "negative":
        q = q * 3 - 1
    elif kind == "nan":
        q = torch.where(q < 0.2, float("nan"), q)
    elif kind == "unnormalised":
        q = q * 5
    elif kind == "one-hot" and q.numel():
        dim = 0 if len(shape) == 1 else 1
        q = torch.zeros_like(q).scatter_(dim, q.argmax(dim, keepdim=True), 1.0)
    elif kind == "zeros":
        q = torch.zeros_like(q)
    if x.numel():
        flat = x.view(-1)
        special = {"huge": 1e4, "-inf": float("-inf"), "nan": float("nan"), "+inf": float("inf")}.get(logits)
        if special is not None:
            flat[torch.randint(0, flat.numel(), (1,), generator=gen)] = special
    if dtype == torch.float32 and logits == "huge":
        x = x / 10
    x, q = x.to(dtype), q.to(dtype)
    _, _, kw = _case(shape, OPTIONS[options], dtype, seed=seed)  # its weights and sample weights
    kw["reduction"] = reduction
    with serve(path):
        ours = value_and_grad(fused_wloss.cross_entropy, Sample("ours", (x, q), kw, False))
    exact = _exact(x, q, kw)
    tol = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-4, 1e-5)}[dtype]
    for got, want, what in zip(ours, exact, ("value", "gradient")):
        assert got.shape == want.shape, what
        g, e = got.double(), want
        assert torch.equal(g.isnan(), e.isnan()), (what, case, g, e)
        finite = torch.isfinite(e)
        assert torch.equal(g[~finite & ~e.isnan()], e[~finite & ~e.isnan()]), (what, case)
        scale = max(1.0, e[finite].abs().max().item() if finite.any() else 1.0)
        assert ((g[finite] - e[finite]).abs() <= tol[0] * e[finite].abs() + tol[1] * scale).all(), (what, case, g, e)


@pytest.mark.parametrize("path", PATHS)
def test_more_rows_than_the_cuda_grid(path):
    """Many rows: on CUDA, 2^14 + 700 rows of 5 classes take 534 blocks of the grouped rows kernels
    (the block-per-row forward's fixed grid, walked past by "rows-block" above, applies to wider
    rows only)."""
    x, q, kw = _case((16384 + 700, 5), OPTIONS["everything"], torch.float64, seed=3)
    with serve(path):
        x, q, kw = on_device(path, x, q, kw)
        for reduction in ("mean", "none"):
            got = value_and_grad(fused_wloss.cross_entropy, Sample("ours", (x, q), dict(kw, reduction=reduction), False))
            want = _exact(x, q, dict(kw, reduction=reduction))
            torch.testing.assert_close(got[0].cpu(), want[0].cpu(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[1].cpu(), want[1].cpu(), rtol=1e-10, atol=1e-12)
