"""The compiled CPU kernels against the reference: every layout and chunking path, every
instruction-set build, every dtype; opcheck, gradcheck, determinism, double backward, int64 indexing.

Shapes are chosen to reach each path of csrc/cpu/kernels_impl.h: the row path (C >= 32) with
vector tails, the tiled path (C < 32) with partial tiles, the K-dim column path with partial
vectors, and several chunks of each (see make_ce_layout in csrc/cpu/kernel_table.h).
"""

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import BatchWeighting, _extension, reference

from helpers import classes_last

pytestmark = pytest.mark.skipif(
    fused_wloss.backend("cpu") != "extension",
    reason=f"compiled CPU kernels not loaded: {_extension.load_error()}",
)


@pytest.fixture(params=_extension.available_cpu_isas() or ["none"])
def isa(request):
    """Run the test once with the kernels of every instruction set this CPU runs."""
    before = _extension.cpu_isa()
    _extension.use_cpu_isa(request.param)
    yield request.param
    _extension.use_cpu_isa(before.lower() if before else request.param)


CE_SHAPES = {
    "rows-tail": (6, 45),  # C not a multiple of any vector width
    "rows-chunks": (250, 300),  # 109 rows a chunk: three chunks
    "rows-groups": (900, 40),  # 819 rows a chunk: epilogue groups of 16 rows, partial at both chunks' ends
    "tiled-partial": (37, 7),  # two full tiles and a partial one
    "tiled-chunks": (3500, 20),  # 1648 rows a chunk: three chunks
    "tiled-c1": (19, 1),
    "kdim-tail": (3, 6, 37),  # P = 37: partial vectors
    "kdim-chunks": (2, 40, 900),  # 816 pixels a chunk: two chunks per sample
    "kdim-3d": (2, 3, 5, 7),
    "unbatched": (33,),
}

CE_OPTIONS = {
    "plain": {},
    "weight-ignore": {"weight": True, "ignore": True},
    "smooth-weight": {"weight": True, "label_smoothing": 0.2, "ignore": True},
    "dynamic-sample": {"class_weighting": "inverse", "sample_weight": True, "ignore": True},
    "everything": {"weight": True, "label_smoothing": 0.1, "sample_weight": True, "ignore": True,
                   "class_weighting": BatchWeighting("effective_number", beta=0.99)},
    "inverse-sqrt": {"class_weighting": BatchWeighting("inverse_sqrt", smoothing=0.5)},
}


def _ce_inputs(shape, options, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = torch.randint(0, num_classes, tshape, generator=gen)
    kwargs = {}
    if options.get("ignore") and t.numel() > 1:
        t = torch.where(torch.rand(tshape, generator=gen) < 0.2, torch.full_like(t, -100), t)
    if options.get("weight"):
        kwargs["weight"] = torch.rand(num_classes, generator=gen, dtype=torch.float64).to(dtype) + 0.2
    if options.get("sample_weight"):
        kwargs["sample_weight"] = torch.rand(tshape, generator=gen, dtype=torch.float64).to(dtype) + 0.1
    for k in ("label_smoothing", "class_weighting"):
        if k in options:
            kwargs[k] = options[k]
    return x, t, kwargs


def _value_and_grad(fn, x, *args, grad_seed=7, **kwargs):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    return out.detach(), grad


def _assert_within_twice_torch(ours, theirs, exact, dtype):
    """For each of (value, gradient): our max error against the float64 `exact` is at most twice
    torch's at the same dtype, plus a floor of 4 ulp of the largest value (for errors torch
    happens to get exactly right)."""
    eps = torch.finfo(dtype).eps
    for o, th, ex in zip(ours, theirs, exact):
        err_ours = (o.double() - ex).abs().max().item()
        err_torch = (th.double() - ex).abs().max().item()
        assert err_ours <= 2 * err_torch + 4 * eps * ex.abs().max().item(), (err_ours, err_torch)


def _ref_in_float64(fn_ref, x, *args, **kwargs):
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    return _value_and_grad(fn_ref, x.double(), *args, **kwargs)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sample_mean"])
@pytest.mark.parametrize("options", list(CE_OPTIONS), ids=str)
@pytest.mark.parametrize("shape", list(CE_SHAPES), ids=str)
def test_cross_entropy_paths_match_reference(isa, shape, options, reduction):
    x, t, kwargs = _ce_inputs(CE_SHAPES[shape], CE_OPTIONS[options])
    got = _value_and_grad(fused_wloss.cross_entropy, x, t, reduction=reduction, **kwargs)
    expected = _value_and_grad(reference.cross_entropy, x, t, reduction=reduction, **kwargs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["rows-tail", "rows-chunks", "rows-groups", "tiled-partial", "kdim-tail", "kdim-chunks"])
@pytest.mark.parametrize("options", ["plain", "everything"])
def test_cross_entropy_low_precision_error_within_twice_torch(isa, dtype, shape, options):
    """Our error against a float64 computation is at most 2x torch's own error at the same dtype."""
    x64, t, kwargs64 = _ce_inputs(CE_SHAPES[shape], CE_OPTIONS[options])
    x = x64.to(dtype)
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs64.items()}
    exact = _ref_in_float64(reference.cross_entropy, x, t, reduction="none", **kwargs)
    ours = _value_and_grad(fused_wloss.cross_entropy, x, t, reduction="none", **kwargs)
    # torch at this dtype: its own function where it has the option, else the reference's torch ops
    # run in this dtype without upcasting
    torch_kwargs = {k: v for k, v in kwargs.items() if k in ("weight", "label_smoothing")}
    if "class_weighting" in kwargs or "sample_weight" in kwargs:
        theirs = _value_and_grad(_reference_in_dtype, x, t, reduction="none", **kwargs)
    else:
        theirs = _value_and_grad(F.cross_entropy, x, t, reduction="none", **torch_kwargs)
    _assert_within_twice_torch(ours, theirs, exact, dtype)


def _reference_in_dtype(x, t, **kwargs):
    """The reference's formulas evaluated by torch in x's own dtype (how torch would run them)."""
    from fused_wloss import _checks

    args = _checks.check_cross_entropy(x, t, kwargs.get("weight"), -100, kwargs["reduction"],
                                       kwargs.get("label_smoothing", 0.0), kwargs.get("sample_weight"),
                                       kwargs.get("class_weighting"))
    orig = reference._compute_dtype
    reference._compute_dtype = lambda dtype: dtype
    try:
        return reference.cross_entropy_checked(x, t, kwargs.get("weight"), -100, args.reduction,
                                               kwargs.get("label_smoothing", 0.0), kwargs.get("sample_weight"),
                                               args.weighting, False)
    finally:
        reference._compute_dtype = orig


def test_noncontiguous_inputs(isa):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 64, generator=gen, dtype=torch.float64)
    cases = [
        (base[:, ::2], torch.randint(0, 32, (40,), generator=gen)),  # strided classes
        (base.t()[:50], torch.randint(0, 40, (50,), generator=gen)),  # transposed
        (torch.randn(4, 9, 6, 5, generator=gen, dtype=torch.float64).permute(0, 1, 3, 2),
         torch.randint(0, 9, (4, 5, 6), generator=gen)),  # permuted spatial dims
    ]
    for x, t in cases:
        assert not x.is_contiguous()
        for kwargs in ({}, {"class_weighting": "inverse", "label_smoothing": 0.1}):
            got = _value_and_grad(fused_wloss.cross_entropy, x, t, reduction="none", **kwargs)
            expected = _value_and_grad(F.cross_entropy if not kwargs else reference.cross_entropy, x, t,
                                       reduction="none", **kwargs)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-13)
        # a non-contiguous target
        t2 = torch.stack([t, t], -1)[..., 0]
        torch.testing.assert_close(fused_wloss.cross_entropy(x, t2), F.cross_entropy(x, t))


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("options", ["plain", "everything"])
@pytest.mark.parametrize("shape", [(3, 7, 5, 6), (2, 40, 9, 30), (2, 4, 3, 5, 2), (5, 33, 17)], ids=str)
def test_classes_last_logits_are_read_in_place(isa, shape, options, reduction):
    """channels_last (4-D), channels_last_3d (5-D) and any layout with the classes innermost: the
    kernels read them as rows of classes, with no contiguous copy, and the gradient comes back in
    the logits' own layout."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = classes_last(shape, gen)
    if len(shape) == 4:
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    _, t, kwargs = _ce_inputs(shape, CE_OPTIONS[options], seed=len(shape))
    got = _value_and_grad(fused_wloss.cross_entropy, x, t, reduction=reduction, **kwargs)
    expected = _value_and_grad(reference.cross_entropy, x.contiguous(), t, reduction=reduction, **kwargs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-13)
    assert got[1].stride() == x.stride(), (got[1].stride(), x.stride())
    fake = fused_wloss.ops.ce_grad_like(x)  # the backward's fake kernel lays its output out alike
    assert fake.stride() == x.stride()


@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (4, 5, 0), (2, 0)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_inputs(shape, reduction):
    x = torch.randn(shape, requires_grad=True)
    t = torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
    if shape[1] == 0 and t.numel():
        return  # no class to point at
    got = fused_wloss.cross_entropy(x, t, reduction=reduction)
    expected = F.cross_entropy(x.detach(), t, reduction=reduction)
    torch.testing.assert_close(got.detach(), expected, equal_nan=True)
    (g,) = torch.autograd.grad(got.sum(), x)
    assert g.shape == x.shape
    b = fused_wloss.binary_cross_entropy_with_logits(x, torch.rand(shape), reduction=reduction)
    torch.testing.assert_close(b.detach(), F.binary_cross_entropy_with_logits(x.detach(), torch.rand(shape), reduction=reduction), equal_nan=True)


# ---- BCE ----------------------------------------------------------------------------------------

BCE_SHAPES = {"small": (6, 5), "wide": (7, 45), "chunks": (2000, 13), "1d-chunks": (20000,), "3d": (3, 5, 17), "0d": ()}
BCE_OPTIONS = {
    "plain": {},
    "label-weights": {"weight": "label", "pos_weight": True},
    "full-weight": {"weight": "full", "sample_weight": True},
    "inverse": {"class_weighting": "inverse", "pos_weight": True},
    "balanced-everything": {"class_weighting": BatchWeighting("inverse_sqrt", balanced=True), "weight": "full",
                            "pos_weight": True, "sample_weight": True},
    "row-weight": {"weight": "row"},
}


def _bce_inputs(shape, options, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype)
    t = (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3).to(dtype)
    labels = shape[-1:] if len(shape) >= 2 else (1,) if len(shape) == 1 else ()
    rows = shape[:-1] if len(shape) >= 2 else shape
    kwargs = {}
    w = options.get("weight")
    if w == "label":
        kwargs["weight"] = torch.rand(labels, generator=gen, dtype=torch.float64).to(dtype) + 0.2
    elif w == "full":
        kwargs["weight"] = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype) + 0.2
    elif w == "row" and len(shape) >= 2:
        kwargs["weight"] = torch.rand(rows + (1,), generator=gen, dtype=torch.float64).to(dtype) + 0.2
    if options.get("pos_weight"):
        kwargs["pos_weight"] = torch.rand(labels, generator=gen, dtype=torch.float64).to(dtype) * 3 + 0.2
    if options.get("sample_weight"):
        kwargs["sample_weight"] = torch.rand(rows, generator=gen, dtype=torch.float64).to(dtype) + 0.1
    if "class_weighting" in options:
        kwargs["class_weighting"] = options["class_weighting"]
    return x, t, kwargs


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("options", list(BCE_OPTIONS), ids=str)
@pytest.mark.parametrize("shape", list(BCE_SHAPES), ids=str)
def test_bce_paths_match_reference(isa, shape, options, reduction):
    x, t, kwargs = _bce_inputs(BCE_SHAPES[shape], BCE_OPTIONS[options])
    got = _value_and_grad(fused_wloss.binary_cross_entropy_with_logits, x, t, reduction=reduction, **kwargs)
    expected = _value_and_grad(reference.binary_cross_entropy_with_logits, x, t, reduction=reduction, **kwargs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", ["plain", "label-weights"])
def test_bce_low_precision_error_within_twice_torch(isa, dtype, options):
    x64, t64, kw64 = _bce_inputs((300, 45), BCE_OPTIONS[options])
    x, t = x64.to(dtype), t64.to(dtype)
    kwargs = {k: v.to(dtype) for k, v in kw64.items()}
    exact = _value_and_grad(F.binary_cross_entropy_with_logits, x.double(), t.double(), reduction="none",
                            **{k: v.double() for k, v in kwargs.items()})
    ours = _value_and_grad(fused_wloss.binary_cross_entropy_with_logits, x, t, reduction="none", **kwargs)
    theirs = _value_and_grad(F.binary_cross_entropy_with_logits, x, t, reduction="none", **kwargs)
    _assert_within_twice_torch(ours, theirs, exact, dtype)


def test_bce_extreme_logits_are_finite_and_exact():
    x = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        got = _value_and_grad(fused_wloss.binary_cross_entropy_with_logits, x.to(dtype), t.to(dtype), reduction="none")
        expected = _value_and_grad(F.binary_cross_entropy_with_logits, x.to(dtype), t.to(dtype), reduction="none")
        for g, e in zip(got, expected):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, e)


# ---- dispatcher-level checks --------------------------------------------------------------------

def _op_samples():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(9, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 6, (9, 4), generator=gen)
    t[0, 0] = -100
    sw = torch.rand(9, 4, generator=gen, dtype=torch.float64)
    w = torch.rand(6, generator=gen, dtype=torch.float64)
    yield "ce", (x, t, w, sw, -100, 0.1, 2, 1, 1.0, 0.999)
    yield "ce", (x, t, None, None, -100, 0.0, 0, 3, 1.0, 0.9)
    # channels_last logits, read in place, their gradient in their own layout
    x4 = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()
    yield "ce", (x4, torch.randint(0, 6, (3, 4, 5), generator=gen), w, None, -100, 0.0, 1, 1, 1.0, 0.999)
    x2 = torch.randn(50, 33, generator=gen, dtype=torch.float32, requires_grad=True)
    yield "ce", (x2, torch.randint(0, 33, (50,), generator=gen).int(), None, None, -100, 0.0, 3, 1, 1.0, 0.999)
    xb = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tb = (torch.rand(12, 5, generator=gen) < 0.4).double()
    yield "bce", (xb, tb, torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5,
                  torch.rand(12, dtype=torch.float64), 2, 1, 1.0, 0.999, True)
    yield "bce", (xb, tb, None, None, None, 0, 0, 1.0, 0.999, False)


@pytest.mark.parametrize("kind, args", list(_op_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(kind, args):
    op = torch.ops.fused_wloss.cross_entropy_forward if kind == "ce" else torch.ops.fused_wloss.bce_forward
    torch.library.opcheck(op, args)


def test_backward_rejects_an_lse_of_the_wrong_shape():
    """The forward's lse is (2, rows), its two parts in rows: a transposed (rows, 2) tensor has the
    right number of elements but would be read in the wrong order, so the backward refuses it."""
    ops = torch.ops.fused_wloss
    x = torch.randn(6, 5)
    t = torch.randint(0, 5, (6,))
    loss, lse, class_weight, norm = ops.cross_entropy_forward(x, t, None, None, -100, 0.0, 2, 0, 1.0, 0.999)
    assert lse.shape == (2, 6) and lse.dtype == torch.float32
    grad = torch.ones_like(loss)
    ops.cross_entropy_backward(grad, x, t, class_weight, None, lse, norm, -100, 0.0, 2)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(2, 6\).*got \[6, 2\]"):
        ops.cross_entropy_backward(grad, x, t, class_weight, None, lse.t().contiguous(), norm, -100, 0.0, 2)


@pytest.mark.parametrize("kind, args", list(_op_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_backward_ops(kind, args):
    """The backward operators on what their forward saved, with a non-trivial upstream gradient."""
    ops = torch.ops.fused_wloss
    if kind == "ce":
        x, t, _w, sw, ignore_index, smoothing, reduction = args[:7]
        loss, lse, class_weight, norm = ops.cross_entropy_forward(*args)
        grad = torch.rand_like(loss) + 0.5
        torch.library.opcheck(ops.cross_entropy_backward,
                              (grad, x.detach(), t, class_weight, sw, lse, norm, ignore_index, smoothing, reduction))
    else:
        x, t, w, pw, sw, reduction = args[:6]
        loss, neg, pos = ops.bce_forward(*args)
        grad = torch.rand_like(loss) + 0.5
        torch.library.opcheck(ops.bce_backward, (grad, x.detach(), t, w, pw, sw, neg, pos, reduction))


@pytest.mark.parametrize("case", ["kdim-ignore-smooth-dynamic-sample", "rows", "bce-balanced", "bce-none"])
def test_gradcheck(case):
    gen = torch.Generator().manual_seed(5)
    if case == "kdim-ignore-smooth-dynamic-sample":
        x = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 5, (3, 4), generator=gen)
        t[1, 2] = -100
        sw = torch.rand(3, 4, generator=gen, dtype=torch.float64)
        w = torch.rand(5, generator=gen, dtype=torch.float64)
        fn = lambda x: fused_wloss.cross_entropy(x, t, label_smoothing=0.2, sample_weight=sw,  # noqa: E731
                                                 class_weighting="inverse", weight=w)
    elif case == "rows":
        x = torch.randn(4, 37, generator=gen, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 37, (4,), generator=gen)
        fn = lambda x: fused_wloss.cross_entropy(x, t, reduction="none", class_weighting="inverse_sqrt")  # noqa: E731
    elif case == "bce-balanced":
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        t = (torch.rand(6, 4, generator=gen) < 0.5).double()
        sw = torch.rand(6, generator=gen, dtype=torch.float64)
        pw = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
        fn = lambda x: fused_wloss.binary_cross_entropy_with_logits(  # noqa: E731
            x, t, pos_weight=pw, sample_weight=sw, class_weighting="balanced")
    else:
        x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        t = torch.rand(3, 4, 5, generator=gen, dtype=torch.float64)
        w = torch.rand(3, 4, 5, generator=gen, dtype=torch.float64)
        fn = lambda x: fused_wloss.binary_cross_entropy_with_logits(x, t, reduction="none", weight=w)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


def test_double_backward_is_refused_clearly():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (4,))
    (g,) = torch.autograd.grad(fused_wloss.cross_entropy(x, t), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
    xb = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fused_wloss.binary_cross_entropy_with_logits(xb, torch.rand(4, 5, dtype=torch.float64)), xb, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_gradients_for_weights_go_to_the_reference():
    """The kernels differentiate the logits only; a call that needs the gradient of a weight
    falls back to the reference instead of returning a silent None."""
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, 3, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad(fused_wloss.binary_cross_entropy_with_logits(x, t, weight=w), w)
    expected = F.binary_cross_entropy_with_logits(x, t, reduction="none").sum(0) / x.numel()
    torch.testing.assert_close(gw, expected)
    sw = torch.rand(5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (5,))
    (gs,) = torch.autograd.grad(fused_wloss.cross_entropy(x, y, sample_weight=sw, reduction="sum"), sw)
    torch.testing.assert_close(gs, F.cross_entropy(x, y, reduction="none"))


# ---- determinism and threads -------------------------------------------------------------------

@pytest.mark.parametrize("options", ["everything", "dynamic-sample"])  # per-row and block epilogues
@pytest.mark.parametrize("shape", ["rows-chunks", "rows-groups", "tiled-chunks", "kdim-chunks"])
def test_bitwise_repeatable_across_runs_and_thread_counts(shape, options):
    x, t, kwargs = _ce_inputs(CE_SHAPES[shape], CE_OPTIONS[options], dtype=torch.float32)
    xb, tb, kwb = _bce_inputs(BCE_SHAPES["chunks"], BCE_OPTIONS["balanced-everything"], dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            ce = _value_and_grad(fused_wloss.cross_entropy, x, t, **kwargs)
            bce = _value_and_grad(fused_wloss.binary_cross_entropy_with_logits, xb, tb, **kwb)
            results.append(ce + bce)
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


# ---- int64 indexing ------------------------------------------------------------------------------

def _available_memory_gb():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


BIG_TEST_MEMORY_GB = 12


@pytest.mark.big
@pytest.mark.skipif(os.environ.get("FUSED_WLOSS_SKIP_BIG") == "1", reason="FUSED_WLOSS_SKIP_BIG=1")
@pytest.mark.skipif(
    _available_memory_gb() < BIG_TEST_MEMORY_GB,
    reason=f"the 2^31-element test needs {BIG_TEST_MEMORY_GB} GB of available memory (two 4.3 GB bfloat16 "
    f"tensors and headroom); this machine has {_available_memory_gb():.1f} GB",
)
def test_more_than_2_31_logits():
    """int64 offsets: a bfloat16 input of more than 2^31 elements, forward and backward, checked
    against the reference on a sample of rows: 256 drawn at random over the whole tensor, the first
    and last, and those on both sides of element 2^31 (C = 1000, so that element falls inside a
    row). The logits are a random block of 4099 rows repeated (4099 is prime, so no truncated
    offset lands on a copy of the row it should read), the targets random with some ignored, and
    the call has static, dynamic and smoothing weights. The "mean" over the whole tensor is checked
    against the sum of the "none" output divided by its weights."""
    num_classes, block_rows = 1000, 4099
    n = (2**31 + 2**20) // num_classes + 1
    assert n * num_classes > 2**31
    gen = torch.Generator().manual_seed(0)
    block = (torch.randn(block_rows, num_classes, generator=gen) * 3).to(torch.bfloat16)
    x = torch.empty(n, num_classes, dtype=torch.bfloat16)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        x[start:stop] = block[: stop - start]
    t = torch.randint(0, num_classes, (n,), generator=gen)
    t[torch.randint(0, n, (n // 10,), generator=gen)] = -100
    w = torch.rand(num_classes, generator=gen) + 0.5
    kwargs = {"weight": w, "label_smoothing": 0.1, "class_weighting": "inverse"}
    x.requires_grad_()
    none = fused_wloss.cross_entropy(x, t, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(none.sum(), x)
    none = none.detach()

    # the class weights the kernels applied: w times the dynamic weight of the whole batch's counts
    valid = t != -100
    counts = torch.bincount(t[valid], minlength=num_classes).double()
    class_w = w.double() / (counts + 1)
    boundary = 2**31 // num_classes  # the row that holds element 2^31
    rows = torch.cat([torch.arange(0, 4), torch.arange(boundary - 3, boundary + 4), torch.arange(n - 4, n),
                      torch.randint(0, n, (256,), generator=gen)]).unique()
    xs = x.detach()[rows].float().requires_grad_()
    expected = reference.cross_entropy(xs, t[rows], weight=class_w.float(), label_smoothing=0.1, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), xs)
    torch.testing.assert_close(none[rows].float(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad[rows].float(), expected_grad, rtol=1e-2, atol=1e-4)
    del grad

    mean = fused_wloss.cross_entropy(x.detach(), t, reduction="mean", **kwargs)
    expected_mean = none.double().sum() / class_w[t[valid]].sum()
    torch.testing.assert_close(mean.double(), expected_mean, rtol=5e-3, atol=0)


@pytest.mark.parametrize("num_classes", [1023, 1024], ids=["unaligned-rows", "aligned-rows"])
def test_streamed_gradient_matches_reference(isa, num_classes):
    """A float32 gradient of 16 MB or more is written with non-temporal stores (rows layout): an
    unaligned head, whole vectors with the true-class term folded in, a tail. Targets at both ends
    of the row and in the middle reach every part."""
    gen = torch.Generator().manual_seed(9)
    n = (16 << 20) // (4 * num_classes) + 3
    x = torch.randn(n, num_classes, generator=gen) * 3
    t = torch.randint(0, num_classes, (n,), generator=gen)
    t[0::4], t[1::4], t[2::4] = 0, num_classes - 1, torch.arange(0, 30, dtype=torch.long).repeat(n)[: t[2::4].numel()]
    t[5] = -100
    w = torch.rand(num_classes, generator=gen) + 0.5
    for kwargs in ({}, {"weight": w, "label_smoothing": 0.1}):
        got = _value_and_grad(fused_wloss.cross_entropy, x, t, reduction="none", **kwargs)
        expected = _ref_in_float64(reference.cross_entropy, x, t, reduction="none", **kwargs)
        torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 10), (16, 40), (16, 64), (1, 5, 16)], ids=["tiled", "flat-40", "rows", "kdim"])
def test_backward_lse_factor_matches_float64_taylor(isa, shape):
    """The backward scales each row by exp(-lo), lo the saved lse's low part: float(1 + d (1 + d/2))
    with d = -lo, evaluated in float64 and rounded once (exp in float64 where |d| >= 1e-3), the same
    in the vectorised coefficients of 16 rows (tiled, flat and K-dim paths) as in the row-by-row
    ones (rows path). With zero logits, hi = 0 and reduction "sum", each non-target gradient element
    is that factor itself; d = 2^-24 is a tie in float that a float evaluation rounds down."""
    rows = shape[0] * (shape[2] if len(shape) == 3 else 1)
    x = torch.zeros(shape)
    t = torch.zeros((shape[0],) + shape[2:], dtype=torch.long)
    lo = torch.tensor([-2.0**-24, 2.0**-24, -3 * 2.0**-25, 1e-4, -5e-4, 2e-3, -3e-3, 0.0] * 2)[:rows]
    lse = torch.stack([torch.zeros(rows), lo])
    ops = torch.ops.fused_wloss
    grad = ops.cross_entropy_backward(torch.ones(()), x, t, torch.empty(0), None, lse, torch.ones(()), -100, 0.0, 1)
    d = -lo.double()
    factor = torch.where(d.abs() < 1e-3, 1 + d * (1 + 0.5 * d), d.exp()).float()
    per_row = grad.movedim(1, -1).reshape(rows, shape[1])[:, 1:]
    assert torch.equal(per_row, factor[:, None].expand_as(per_row)), (per_row[:, 0], factor)


@pytest.mark.parametrize("num_classes", [33, 40, 47, 48])
def test_float32_flat_backward_of_32_to_47_classes(isa, num_classes):
    """A float32 gradient under 16 MB with 32 <= C < 48 is written 16 rows at a time as flat vectors
    (flat_tile), not row by row; C = 48 takes the rows path. A chunk holds 32768 // C rows, so tiles
    are cut short at chunk ends (at C = 40 and 47 in both chunks, at C = 33 in the last); targets at
    both ends of the row, ignored rows, every weighting, and an upstream gradient per element
    ("none") as well as a scalar one ("mean")."""
    gen = torch.Generator().manual_seed(21)
    n = 1000  # 32768 // C rows a chunk: chunks end inside a tile
    x = torch.randn(n, num_classes, generator=gen) * 3
    t = torch.randint(0, num_classes, (n,), generator=gen)
    t[0::5], t[1::5], t[7::11] = 0, num_classes - 1, -100
    w = torch.rand(num_classes, generator=gen) + 0.5
    s = torch.rand(n, generator=gen) + 0.1
    for reduction in ("none", "mean"):
        for kwargs in ({}, {"weight": w, "label_smoothing": 0.1, "sample_weight": s}, {"class_weighting": "inverse"}):
            got = _value_and_grad(fused_wloss.cross_entropy, x, t, reduction=reduction, **kwargs)
            expected = _ref_in_float64(reference.cross_entropy, x, t, reduction=reduction, **kwargs)
            torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-5, atol=1e-6 if reduction == "none" else 1e-9)


def test_inference_mode_with_grad_enabled_builds_no_graph(isa):
    """enable_grad inside inference_mode: no graph can be recorded there (its outputs are inference
    tensors), so the eager autograd.Function must stand aside and the call just compute the loss."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(16, 5, generator=gen, requires_grad=True)
    t = torch.randint(0, 5, (16,), generator=gen)
    y = (torch.rand(16, 5, generator=gen) < 0.3).float()
    with torch.inference_mode(), torch.enable_grad():
        ce = fused_wloss.cross_entropy(x, t, class_weighting="inverse")
        bce = fused_wloss.binary_cross_entropy_with_logits(x, y, class_weighting="inverse")
    assert ce.grad_fn is None and bce.grad_fn is None
    torch.testing.assert_close(ce, reference.cross_entropy(x.detach(), t, class_weighting="inverse"))
    torch.testing.assert_close(bce, reference.binary_cross_entropy_with_logits(x.detach(), y, class_weighting="inverse"))


@pytest.mark.parametrize("options", [{}, {"weight": True}, {"label_smoothing": 0.1}], ids=str)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 40), (40, 5), (40, 50)], ids=["kdim", "tiled", "rows"])
def test_out_of_range_target_names_its_element(isa, shape, target_dtype, options):
    """The kernels' epilogues (the block one of plain cross-entropy, the per-row one otherwise)
    report the first bad target by its index in the whole target tensor: here element 20, in the
    second block of 16 pixels (rows) of the first sample, ahead of another bad one at element 33."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(shape, generator=gen)
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen).to(target_dtype)
    t.view(-1)[20], t.view(-1)[33] = -3, shape[1]
    kwargs = dict(options)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(shape[1], generator=gen) + 0.5
    with pytest.raises(IndexError, match=r"found -3 at element 20$"):
        fused_wloss.cross_entropy(x, t, **kwargs)


@pytest.mark.parametrize("ignore_index", [-100, 0, 2**40], ids=["ignore-100", "ignore-class-0", "ignore-2^40"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 37), (37, 7), (2, 19, 48)], ids=["kdim-partial", "tiled-partial", "kdim-full"])
def test_block_epilogue_targets_and_options(isa, shape, target_dtype, ignore_index):
    """The block epilogue of plain cross-entropy (on AVX-512 all 16 lanes at once: targets checked as
    vectors, in int64 for int64 targets, ignore_index compared even where it does not fit the
    targets' int32), full and partial blocks, with weights, sample weights, every reduction."""
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(shape, generator=gen) * 3
    tshape = shape[:1] + shape[2:]
    t = torch.randint(0, shape[1], tshape, generator=gen)
    if ignore_index != 2**40:  # every fifth element ignored; 2^40 matches no target
        t.view(-1)[::5] = ignore_index
    t = t.to(target_dtype)
    w = torch.rand(shape[1], generator=gen) + 0.5
    s = torch.rand(tshape, generator=gen) + 0.1
    for kwargs in ({}, {"weight": w}, {"weight": w, "sample_weight": s}, {"class_weighting": "inverse"}):
        for reduction in ("none", "sum", "mean"):
            got = _value_and_grad(fused_wloss.cross_entropy, x, t, ignore_index=ignore_index, reduction=reduction, **kwargs)
            expected = _ref_in_float64(reference.cross_entropy, x, t.long(), ignore_index=ignore_index,
                                       reduction=reduction, **kwargs)
            torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 7, 37), (37, 7)], ids=["kdim", "tiled"])
def test_int64_target_beyond_int32_is_reported(isa, shape):
    """An int64 target of 2^32 + 1 is out of range, not class 1: the kernels check int64 targets
    before narrowing them."""
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(shape, generator=gen)
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
    t.view(-1)[20] = 2**32 + 1
    with pytest.raises(IndexError, match=r"found 4294967297 at element 20$"):
        fused_wloss.cross_entropy(x, t)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "input_without_grad"])
def test_calls_that_build_no_graph(isa, context):
    """Evaluation calls run the forward operator below the autograd key (ops._eager_no_graph): the
    loss must equal the reference's, carry no graph, and the operator must still be seen by
    dispatch modes beneath autograd (torch.utils._python_dispatch), as a profiler or FakeTensorMode
    would see it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(16, 5, 3, generator=gen, requires_grad=context != "input_without_grad")
    t = torch.randint(0, 5, (16, 3), generator=gen)
    y = (torch.rand(16, 5, 3, generator=gen) < 0.3).float()
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "input_without_grad": contextlib.nullcontext}[context]
    seen = Seen()
    with ctx(), seen:
        ce = fused_wloss.cross_entropy(x, t, class_weighting="inverse")
        bce = fused_wloss.binary_cross_entropy_with_logits(x, y, class_weighting="inverse")
    assert ce.grad_fn is None and bce.grad_fn is None
    assert {"fused_wloss.cross_entropy_forward", "fused_wloss.bce_forward"} <= seen.ops, seen.ops
    torch.testing.assert_close(ce, reference.cross_entropy(x.detach(), t, class_weighting="inverse"))
    torch.testing.assert_close(bce, reference.binary_cross_entropy_with_logits(x.detach(), y, class_weighting="inverse"))


@pytest.mark.parametrize("num_labels", [1001, 1024], ids=["unaligned-chunks", "aligned-chunks"])
def test_bce_streamed_gradient_matches_reference(isa, num_labels):
    """A float32 BCE gradient of 16 MB or more is streamed too: each chunk of rows stores a head up
    to the first aligned address, whole vectors with non-temporal stores, and a tail; with 1001
    labels the chunks start at every alignment."""
    gen = torch.Generator().manual_seed(10)
    n = (16 << 20) // (4 * num_labels) + 5
    x = torch.randn(n, num_labels, generator=gen) * 4
    t = (torch.rand(n, num_labels, generator=gen) < 0.3).float()
    w = torch.rand(num_labels, generator=gen) + 0.5
    for kwargs in ({}, {"weight": w, "pos_weight": w.flip(0)}, {"class_weighting": "inverse"}):
        got = _value_and_grad(fused_wloss.binary_cross_entropy_with_logits, x, t, reduction="sum", **kwargs)
        expected = _ref_in_float64(reference.binary_cross_entropy_with_logits, x, t.double(), reduction="sum", **kwargs)
        torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3000, 7), (40000, 3), (70000, 3), (1030, 31), (700, 45), (2050, 33)],
                         ids=["flat-blocks-and-rest", "flat-whole-blocks", "flat-64v-block", "flat-widest", "rows-tail",
                              "rows-one-full"])
def test_bce_label_sums_of_dynamic_weights(isa, dtype, shape):
    """The per-label target sums behind the dynamic BCE weights: few labels go through flat vectors
    (V rows at a time, lanes of several labels), many through vectors along each row; both in
    blocks, with rows and labels left over. Soft targets, so every sum is a real addition."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen).to(dtype)
    t = torch.rand(shape, generator=gen).to(dtype)
    t[::3] = (t[::3] > 0.7).to(dtype)
    _, stats = fused_wloss.binary_cross_entropy_with_logits(x, t, class_weighting="balanced", return_stats=True)
    td = t.double()
    pos, neg = td.sum(0), (1.0 - td).sum(0)
    torch.testing.assert_close(stats.pos_weight.double(), 1.0 / (pos + 1.0), rtol=2e-6, atol=0)
    torch.testing.assert_close(stats.neg_weight.double(), 1.0 / (neg + 1.0), rtol=2e-6, atol=0)


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("shape, smoothing", [((8, 100), 0.0), ((8, 1000), 0.1), ((4, 7), 0.1), ((2, 9, 20), 0.1)],
                         ids=["rows", "rows-smooth", "tiled-smooth", "kdim-smooth"])
def test_large_logits_keep_float32_accuracy(isa, offset, shape, smoothing):
    """Logits around 1e4..1e5: the kernels form every lse - x from differences to the row maximum
    (and save the lse as a rounded part and its remainder), so their error stays within 2x torch's
    own float32 error."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) + offset).float()
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
    kwargs = {"reduction": "none", "label_smoothing": smoothing}
    exact = _value_and_grad(F.cross_entropy, x.double(), t, **kwargs)
    ours = _value_and_grad(fused_wloss.cross_entropy, x, t, **kwargs)
    theirs = _value_and_grad(F.cross_entropy, x, t, **kwargs)
    _assert_within_twice_torch(ours, theirs, exact, torch.float32)


def test_no_classes():
    """C = 0: only ignored targets are valid (each element's loss is 0), anything else is an
    IndexError, as in the reference."""
    x = torch.empty(3, 0, requires_grad=True)
    for fn in (fused_wloss.cross_entropy, reference.cross_entropy):
        with pytest.raises(IndexError, match=r"found 0 at element 0"):
            fn(x, torch.tensor([0, 5, -100]), reduction="none")
        ignored = torch.full((3,), -100)
        assert torch.equal(fn(x, ignored, reduction="none").detach(), torch.zeros(3))
        assert fn(x, ignored, reduction="sum").item() == 0.0
        assert torch.isnan(fn(x, ignored, reduction="mean"))


def test_bce_backward_rejects_label_weights_of_the_wrong_size():
    x = torch.randn(4, 8)
    t = torch.rand(4, 8)
    g = torch.ones(())
    with pytest.raises(RuntimeError, match="neg_label_weight must have 0 or 8 elements, got 1"):
        torch.ops.fused_wloss.bce_backward(g, x, t, None, None, None, torch.ones(1), torch.ones(1), 1)
