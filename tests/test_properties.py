"""Property-based tests: the compiled CPU kernels agree with the reference on random calls.

Hypothesis draws a *case* (a frozen dataclass: shape, options, memory layout of every tensor, the
instruction-set build of the kernels, and a seed for the tensor data); the test builds the tensors
from it and requires that the public ``fused_wloss.cross_entropy`` / ``binary_cross_entropy_with_logits``
(which run the kernels) agree with ``fused_wloss.reference`` in value and in the input gradient,
taken with ``torch.autograd.grad`` and a random upstream gradient (a tensor for ``reduction="none"``).
NaN must meet NaN (``"mean"`` of an empty or all-ignored batch). A failing case prints as its
dataclass; ``check_ce(case, dtype)`` / ``check_bce(case, dtype)`` replay it in a plain script.

The reference runs in float64 (for float32 inputs, on the same float32 numbers). Allowed error per
element: ``rtol * |expected| + atol * max(1, max |expected|)``, rtol/atol 1e-9/1e-11 for float64 and
1e-4/1e-5 for float32 (the max term because dynamic weights up to 1 / 1e-3 scale whole tensors), and
for float32 also twice the reference's own float32 error (torch's ``x + softplus(-x)`` cancels).

Cases the properties once found are kept as regression tests at the end.
Each property runs ``max_examples`` examples, derandomized so that CI sees the same cases every run;
``FUSED_WLOSS_HYPOTHESIS_EXAMPLES=N`` runs N per property instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import pytest
import torch

import fused_wloss
from fused_wloss import BatchWeighting, _extension, ops, reference

pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(
    fused_wloss.backend("cpu") != "extension",
    reason=f"compiled CPU kernels not loaded (backend is {fused_wloss.backend('cpu')!r}): "
    f"{_extension.load_error()}",
)

from fuzzing import fuzz_settings  # noqa: E402
from helpers import emulation_namespace  # noqa: E402


def _settings(default_examples: int):
    return fuzz_settings(default_examples)


TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-4, 1e-5)}
ISAS = tuple(_extension.available_cpu_isas()) or ("none",)
LAYOUTS = ("contiguous", "offset", "strided", "permuted")
REDUCTIONS = ("none", "sum", "mean", "sample_mean")
SCHEMES = ("inverse", "inverse_sqrt", "effective_number")
# Largest cross-entropy input drawn (elements): N is cut so that N * C * d1 * d2 stays below it.
CE_MAX_ELEMENTS = 2**17


# ---- building tensors from a case ----------------------------------------------------------------

def _place(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in a fresh tensor with the given memory layout."""
    if layout == "contiguous":
        return t.clone()
    if layout == "offset" or t.dim() == 0:
        flat = torch.empty(t.numel() + 3, dtype=t.dtype)  # storage offset 3: misaligned data
        flat[3:] = t.flatten()
        return flat[3:].view(t.shape)
    if layout == "strided" or (layout == "permuted" and t.dim() < 2):
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        view = big[..., ::2]  # every other element of the last dimension
        view.copy_(t)
        return view
    if layout == "permuted":  # all dimensions reversed in memory
        rev = tuple(reversed(range(t.dim())))
        return t.permute(rev).contiguous().permute(rev)
    if layout == "broadcast":  # stride 0 along dimension 0 (every sample the same)
        return t[:1].expand(t.shape) if t.dim() >= 1 and t.shape[0] > 0 else t.clone()
    raise AssertionError(layout)


def _weights(shape, kind: Optional[str], gen) -> Optional[torch.Tensor]:
    if kind is None:
        return None
    w = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1
    if kind == "with_zeros":
        w = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3, 0.0, w)
    return w


@dataclasses.dataclass(frozen=True)
class CeCase:
    shape: Tuple[int, ...]  # (C,), (N, C), (N, C, d1) or (N, C, d1, d2)
    target_dtype: str = "int64"
    ignore_index: int = -100
    ignore_fraction: float = 0.0
    weight: Optional[str] = None  # None, "positive", "with_zeros"
    label_smoothing: float = 0.0
    sample_weight: Optional[str] = None  # None, "positive", "with_zeros"
    class_weighting: Union[None, str, BatchWeighting] = None
    reduction: str = "mean"
    layout: str = "contiguous"  # of the input; see _place
    aux_layout: str = "contiguous"  # of target, weight and sample_weight
    scale: float = 4.0  # logits are randn * scale
    isa: str = ISAS[0]
    seed: int = 0


def build_ce(case: CeCase, dtype: torch.dtype):
    """(input, target, kwargs) of a cross_entropy call; the input is a leaf (no grad yet)."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = case.shape
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    loss_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * case.scale
    t = torch.randint(0, num_classes, loss_shape, generator=gen)
    ignored = torch.rand(loss_shape, generator=gen) < case.ignore_fraction
    t = torch.where(ignored, torch.full_like(t, case.ignore_index), t)
    t = t.to(getattr(torch, case.target_dtype))
    kwargs = {
        "ignore_index": case.ignore_index,
        "reduction": case.reduction,
        "label_smoothing": case.label_smoothing,
        "class_weighting": case.class_weighting,
    }
    for name, kind, wshape in (("weight", case.weight, (num_classes,)),
                               ("sample_weight", case.sample_weight, loss_shape)):
        w = _weights(wshape, kind, gen)
        if w is not None:
            kwargs[name] = _place(w.to(dtype), case.aux_layout)
    return _place(x.to(dtype), case.layout), _place(t, case.aux_layout), kwargs


@dataclasses.dataclass(frozen=True)
class BceCase:
    shape: Tuple[int, ...]  # rank 0..3; the last dimension holds the labels
    soft_target: bool = False
    weight: Optional[str] = None  # None, "label", "full", "row", "scalar", "label_expanded"
    pos_weight: bool = False
    sample_weight: bool = False
    class_weighting: Union[None, str, BatchWeighting] = None
    reduction: str = "mean"
    layout: str = "contiguous"
    aux_layout: str = "contiguous"
    scale: float = 4.0
    isa: str = ISAS[0]
    seed: int = 0


def build_bce(case: BceCase, dtype: torch.dtype):
    """(input, target, kwargs) of a binary_cross_entropy_with_logits call."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = case.shape
    labels = shape[-1:] if len(shape) >= 2 else (1,) if len(shape) == 1 else ()
    rows = shape[:-1] if len(shape) >= 2 else shape
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * case.scale
    t = torch.rand(shape, generator=gen, dtype=torch.float64)
    if not case.soft_target:
        t = (t < torch.rand((), generator=gen, dtype=torch.float64)).to(torch.float64)
    kwargs = {"reduction": case.reduction, "class_weighting": case.class_weighting}
    weight_shape = {"label": labels, "full": shape, "row": rows + (1,), "scalar": (),
                    "label_expanded": labels}.get(case.weight)
    if weight_shape is not None:
        w = torch.rand(weight_shape, generator=gen, dtype=torch.float64) + 0.1
        w = _place(w.to(dtype), case.aux_layout)
        kwargs["weight"] = w.expand(shape) if case.weight == "label_expanded" else w
    if case.pos_weight:
        pw = torch.rand(labels, generator=gen, dtype=torch.float64) * 3 + 0.2
        kwargs["pos_weight"] = _place(pw.to(dtype), case.aux_layout)
    if case.sample_weight:
        sw = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.05
        kwargs["sample_weight"] = _place(sw.to(dtype), case.aux_layout)
    return _place(x.to(dtype), case.layout), _place(t.to(dtype), case.aux_layout), kwargs


# ---- comparing -----------------------------------------------------------------------------------

def _value_and_grad(fn, x, *args, **kwargs):
    x = x.detach().requires_grad_()  # the same storage and strides, a fresh leaf
    out = fn(x, *args, **kwargs)
    gen = torch.Generator().manual_seed(99)
    upstream = (torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out.detach(), grad


def _double(kwargs):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kwargs.items()}


def _assert_agree(got, exact, dtype, what, at_dtype=None):
    """``got`` (value, gradient) agrees with ``exact`` (the reference in float64) elementwise within
    atol * max(1, max |exact|) + rtol * |exact|, plus twice the reference's own error at ``dtype``
    (``at_dtype``, the reference run in float32) where given. NaN must meet NaN, inf the same inf."""
    rtol, atol = TOLERANCES[dtype]
    for i, name in enumerate(("value", "input gradient")):
        g, e = got[i], exact[i].double()
        assert g.dtype == dtype and g.shape == e.shape, (what, name, g.dtype, g.shape, e.shape)
        g = g.double()
        finite = torch.isfinite(e)
        scale = max(1.0, e[finite].abs().max().item()) if finite.any() else 1.0
        bound = atol * scale + rtol * e.abs()
        if at_dtype is not None:
            bound = bound + 2 * (at_dtype[i].double() - e).abs()
        same_special = (g == e) | (g.isnan() & e.isnan())
        ok = torch.where(finite, (g - e).abs() <= bound, same_special)
        if not ok.all():
            bad = (~ok).nonzero()[0].tolist()
            idx = tuple(bad)
            raise AssertionError(
                f"{what}: {name} differs at {(~ok).sum().item()} of {ok.numel()} elements; first at "
                f"{idx}: got {g[idx].item()!r}, expected {e[idx].item()!r} (allowed error "
                f"{bound[idx].item():.3g})"
            )


def _with_isa(isa, fn):
    if isa == "none":
        return fn()
    before = _extension.cpu_isa()
    _extension.use_cpu_isa(isa)
    try:
        return fn()
    finally:
        _extension.use_cpu_isa(before.lower())


def _on_path(path: Optional[str], isa: str, fn):
    """fn() on the CPU kernels of `isa`, or (path "emu") on the emulated CUDA kernels."""
    if path == "emu":
        with ops.use_namespace(emulation_namespace()):
            return fn()
    return _with_isa(isa, fn)


def check_ce(case: CeCase, dtype: torch.dtype, path: Optional[str] = None) -> None:
    x, t, kwargs = build_ce(case, dtype)
    assert ops.ce_supported(x, t, kwargs.get("weight"), kwargs.get("sample_weight"), False)
    got = _on_path(path, case.isa, lambda: _value_and_grad(fused_wloss.cross_entropy, x, t, **kwargs))
    exact = _value_and_grad(reference.cross_entropy, x.double(), t, **_double(kwargs))
    at_dtype = None if dtype == torch.float64 else _value_and_grad(reference.cross_entropy, x, t, **kwargs)
    _assert_agree(got, exact, dtype, f"cross_entropy {case}", at_dtype)


def check_bce(case: BceCase, dtype: torch.dtype, path: Optional[str] = None) -> None:
    x, t, kwargs = build_bce(case, dtype)
    assert ops.bce_supported(x, t, kwargs.get("weight"), kwargs.get("pos_weight"), kwargs.get("sample_weight"))
    got = _on_path(path, case.isa, lambda: _value_and_grad(
        fused_wloss.binary_cross_entropy_with_logits, x, t, **kwargs))
    fn = reference.binary_cross_entropy_with_logits
    exact = _value_and_grad(fn, x.double(), t.double(), **_double(kwargs))
    at_dtype = None if dtype == torch.float64 else _value_and_grad(fn, x, t, **kwargs)
    _assert_agree(got, exact, dtype, f"binary_cross_entropy_with_logits {case}", at_dtype)


# ---- strategies ----------------------------------------------------------------------------------

_num_classes = st.one_of(
    st.sampled_from([1, 15, 16, 17, 31, 32, 33, 64, 65]),  # tile and vector boundaries
    st.integers(1, 31),  # tiled path (C < 32)
    st.integers(32, 80),  # row path
)


def _batch_weighting(balanced):
    return st.builds(BatchWeighting, st.sampled_from(SCHEMES), smoothing=st.floats(1e-3, 10.0),
                     beta=st.floats(0.0, 0.9999), balanced=balanced)


@st.composite
def ce_cases(draw, max_elements: int = CE_MAX_ELEMENTS):
    num_classes = draw(_num_classes)
    rank = draw(st.integers(1, 4))
    if rank == 1:
        shape = (num_classes,)
    else:
        spatial = tuple(draw(st.lists(st.integers(0, 40), min_size=rank - 2, max_size=rank - 2)))
        per_sample = num_classes * math.prod(spatial)
        max_n = min(70, max_elements // per_sample) if per_sample else 70
        shape = (draw(st.integers(0, max_n)), num_classes) + spatial
    return CeCase(
        shape=shape,
        target_dtype=draw(st.sampled_from(["int64", "int32"])),
        ignore_index=draw(st.sampled_from([-100, -1, 0, num_classes - 1, num_classes + 3])),
        ignore_fraction=draw(st.sampled_from([0.0, 0.2, 0.6, 1.0])),
        weight=draw(st.sampled_from([None, "positive", "with_zeros"])),
        label_smoothing=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
        sample_weight=draw(st.sampled_from([None, "positive", "with_zeros"])),
        class_weighting=draw(st.one_of(st.sampled_from([None, *SCHEMES]), _batch_weighting(st.just(False)))),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        **_run_options(draw),
    )


def _run_options(draw) -> dict:
    """What both losses draw alike: memory layouts, logit scale, kernel build and data seed."""
    return dict(
        layout=draw(st.sampled_from(LAYOUTS + ("broadcast",))),
        aux_layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0, 20.0])),
        isa=draw(st.sampled_from(ISAS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def bce_cases(draw, max_side: int = 50):
    rank = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=rank, max_size=rank)))
    weights = [None, "label", "full", "scalar", "label_expanded"] + (["row"] if len(shape) >= 2 else [])
    return BceCase(
        shape=shape,
        soft_target=draw(st.booleans()),
        weight=draw(st.sampled_from(weights)),
        pos_weight=draw(st.booleans()),
        sample_weight=draw(st.booleans()),
        class_weighting=draw(st.one_of(st.sampled_from([None, "inverse", "balanced"]),
                                       _batch_weighting(st.booleans()))),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        **_run_options(draw),
    )


# ---- the properties ------------------------------------------------------------------------------

DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)


@DTYPES
@_settings(default_examples=300)
@given(case=ce_cases())
@example(case=CeCase((0, 5), reduction="mean"))  # empty batch: NaN
@example(case=CeCase((9, 40), ignore_fraction=1.0, reduction="mean", class_weighting="inverse"))  # all ignored
@example(case=CeCase((7,), ignore_index=3, ignore_fraction=1.0, reduction="sample_mean"))  # unbatched, ignored
@example(case=CeCase((1, 80, 40, 40), weight="positive", label_smoothing=0.3, class_weighting="effective_number",
                     sample_weight="positive", reduction="none"))  # several K-dim chunks per sample
@example(case=CeCase((70, 1, 17), ignore_index=0, ignore_fraction=0.2, reduction="sum"))
# strided logits whose contiguous copy is a classes-last layout (one class): found when the kernels
# began to read classes-last logits in place (the backward's decision and its helper's disagreed)
@example(case=CeCase((2, 1, 1), reduction="none", layout="strided", scale=0.1))
@example(case=CeCase((3, 4, 1, 1), reduction="mean", layout="strided"))
def test_cross_entropy_kernels_match_reference(dtype, case):
    check_ce(case, dtype)


@DTYPES
@_settings(default_examples=300)
@given(case=bce_cases())
@example(case=BceCase(()))
@example(case=BceCase((0, 4), reduction="mean"))
@example(case=BceCase((20000,), class_weighting="balanced", sample_weight=True, pos_weight=True))  # chunks
@example(case=BceCase((50, 50, 50), weight="row", class_weighting="inverse", reduction="none"))
# float32 x + softplus(-x) cancels at x = -8.4 (weight 32): the kernels' error equals the reference's
@example(case=BceCase((), class_weighting=BatchWeighting("inverse", smoothing=0.03125), reduction="none", seed=218))
def test_bce_kernels_match_reference(dtype, case):
    check_bce(case, dtype)


# The same properties on the emulated CUDA kernels (csrc/emu): every mapping the small draws reach
# (grouped rows, the K-dim pixel grid with and without vectors, flat pixels, BCE vectors and
# elements) on every layout, with fewer and smaller examples (the emulation runs each GPU thread as
# a fiber). Replay a failure with check_ce(case, dtype, "emu").
EMU = pytest.mark.skipif(emulation_namespace() is None, reason="fused_wloss._cuda_emu not built")


@EMU
@DTYPES
@_settings(default_examples=150)
@given(case=ce_cases(max_elements=2**15))
def test_cross_entropy_emulated_cuda_kernels_match_reference(dtype, case):
    check_ce(case, dtype, "emu")


@EMU
@DTYPES
@_settings(default_examples=150)
@given(case=bce_cases(max_side=30))
def test_bce_emulated_cuda_kernels_match_reference(dtype, case):
    check_bce(case, dtype, "emu")


# ---- regressions: cases the properties once found -------------------------------------------------

@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("zeros", ["weight", "sample_weight"])
def test_ce_mean_with_zero_normaliser_is_nan_like_torch(zeros, label_smoothing):
    """Zero weights on every non-ignored target make the "mean" normaliser 0: NaN (not +inf from the
    smoothing term), and NaN gradients for the elements that take part, as torch gives for zero
    class weights; an ignored element keeps a zero gradient."""
    x = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.2, 0.3]], dtype=torch.float64)
    t = torch.tensor([1, -100])
    kwargs = {"label_smoothing": label_smoothing}
    if zeros == "weight":
        kwargs["weight"] = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    else:
        kwargs["sample_weight"] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for fn in (fused_wloss.cross_entropy, reference.cross_entropy):
        xx = x.clone().requires_grad_()
        loss = fn(xx, t, **kwargs)
        (g,) = torch.autograd.grad(loss, xx)
        assert torch.isnan(loss)
        assert torch.isnan(g[0]).all() and torch.equal(g[1], torch.zeros(3, dtype=torch.float64))
    if zeros == "weight":
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(xx, t, **kwargs), xx)
        assert torch.isnan(g[0]).all() and torch.equal(g[1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("case", [
    BceCase((3, 0), sample_weight=True, reduction="sum"),
    BceCase((3, 0), class_weighting="inverse", reduction="sum"),
    BceCase((2, 3, 0), class_weighting="balanced", sample_weight=True, reduction="none"),
], ids=["sample_weight", "inverse", "balanced"])
def test_bce_empty_label_dimension(case):
    check_bce(case, torch.float64)
