"""Hostile input, fuzzed: every call either raises a clear Python exception or equals the reference.

Hypothesis draws calls built to break a kernel that reads memory through user-supplied class
indices and strides: targets at and around every boundary (-1, 0, C - 1, C, C + 1, ignore_index and
its neighbours, the int32 and int64 extremes), ignore_index itself at those values, NaN, +-inf and
huge logits (whole rows of -inf too), zero and negative weights, empty and size-1 dimensions, C = 0,
huge C with a tiny batch and the reverse, mixed dtypes (int32 targets, half-precision logits with
float64 weights), and every tensor as a non-contiguous, offset, expanded (stride 0) or overlapping
(rows sharing memory) view. For each call:

- if the fused function raises, the exception is a TypeError, ValueError, IndexError or
  RuntimeError whose message names the argument at fault, and the reference raises the same type;
  a target outside ``[0, C)`` that is not ``ignore_index`` must raise IndexError (never a read out
  of bounds: the sanitizer lane runs this file against an ASan/UBSan build);
- else the value and the gradient of the input equal the reference's in float64 (NaN where it
  has NaN, the same infinity where it has one), within the tolerances of tests/test_properties.py,
  and the call left every argument unchanged, bit for bit. One deliberate difference: an ignored
  element has a zero gradient even when its logits hold NaN or inf (torch and the reference give
  NaN there, from 0 * NaN in log_softmax's backward), so the reference is run with such rows set
  to 0, which leaves the value as it is;
- where torch has the option (no sample_weight, no class_weighting, torch's reductions, int64
  targets), the value also equals torch's, NaN where torch gives NaN.

Weights are drawn from small dyadic values (exact in every dtype, sums exact in float64), so that
a mixed-sign normaliser is exact; a mixed-sign "mean" of cross-entropy is still left out, because
the dynamic weights are not dyadic and its normaliser may cancel to a rounding error of either sign.
Tolerances scale with the value computed with every weight made positive (the size of the terms
that cancel).

Like test_properties.py: derandomized, ``max_examples`` per property, and
``FUSED_WLOSS_HYPOTHESIS_EXAMPLES=N`` runs N instead. A failing call prints as its dataclass;
``check_ce(case)`` / ``check_bce(case)`` replay it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import pytest
import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import BatchWeighting, _extension, ops, reference

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(
    fused_wloss.backend("cpu") != "extension",
    reason=f"compiled CPU kernels not loaded (backend is {fused_wloss.backend('cpu')!r}): "
    f"{_extension.load_error()}",
)

from fuzzing import fuzz_settings  # noqa: E402


def _settings(default_examples: int):
    return fuzz_settings(default_examples, HealthCheck.filter_too_much)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# rtol, atol (times the scale of the terms): as tests/test_properties.py, and for half precision
# bounded in any case by twice the reference's own error at that dtype
TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3),
              torch.bfloat16: (2e-2, 4e-3)}
WEIGHT_VALUES = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0)  # negated where a case asks for negative weights
MAX_ELEMENTS = 2**17
EXCEPTIONS = (TypeError, ValueError, IndexError, RuntimeError)


# ---- tensors in hostile layouts -------------------------------------------------------------------

def _contiguous_strides(shape):
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def layout_strides(shape: Tuple[int, ...], layout: str) -> Tuple[Tuple[int, ...], int]:
    """(strides, storage offset) of a view of ``shape`` laid out as ``layout``:
    contiguous; offset (storage offset 3); strided (every other element along the last dimension);
    reversed (dimensions reversed in memory: a transpose, or channels-last); expanded (stride 0
    along the first dimension: every sample the same memory); overlapping (every stride 1, so
    neighbouring rows share all but one element)."""
    if layout == "contiguous" or not shape:
        return _contiguous_strides(shape), 0
    if layout == "offset":
        return _contiguous_strides(shape), 3
    if layout == "strided":
        st_ = _contiguous_strides(shape[:-1] + (2 * shape[-1],))
        return st_[:-1] + (2,), 0
    if layout == "reversed":
        rev = _contiguous_strides(tuple(reversed(shape)))
        return tuple(reversed(rev)), 0
    if layout == "expanded":
        return (0,) + _contiguous_strides(shape[1:]), 0
    if layout == "overlapping":
        return (1,) * len(shape), 0
    raise AssertionError(layout)


def storage_size(shape, strides, offset) -> int:
    if any(s == 0 for s in shape):
        return offset + 1
    return offset + 1 + sum((s - 1) * st_ for s, st_ in zip(shape, strides))


def view_of(base: torch.Tensor, shape, layout: str) -> torch.Tensor:
    strides, offset = layout_strides(tuple(shape), layout)
    return base.as_strided(tuple(shape), strides, offset)


def new_base(shape, layout: str, dtype, fill=0) -> torch.Tensor:
    strides, offset = layout_strides(tuple(shape), layout)
    return torch.full((storage_size(shape, strides, offset),), fill, dtype=dtype)


def storage_index(base: torch.Tensor, shape, layout: str) -> torch.Tensor:
    """For each element of the view (in logical order, flattened), its position in ``base``."""
    return view_of(torch.arange(base.numel()), shape, layout).reshape(-1)


def placed(values: torch.Tensor, layout: str, dtype) -> torch.Tensor:
    """A view laid out as ``layout`` that shows ``values`` (which must be equal wherever the layout
    makes elements share memory, as along an expanded dimension)."""
    shape = tuple(values.shape)
    base = new_base(shape, layout, dtype)
    base[storage_index(base, shape, layout)] = values.reshape(-1).to(dtype)
    return view_of(base, shape, layout)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as integers (so that NaN == NaN), for the unchanged-arguments check."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype.is_floating_point:
        flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()])
    return flat.clone()


# ---- comparing ------------------------------------------------------------------------------------

def _finite_max(t: torch.Tensor) -> float:
    t = t.double()
    finite = t[torch.isfinite(t)]
    return finite.abs().max().item() if finite.numel() else 0.0


def assert_agree(got, exact, at_dtype, magnitude, dtype, what, value_dtype=None):
    """``got`` (value, gradient) against ``exact`` (the reference in float64): where exact is
    finite, |got - exact| <= rtol |exact| + atol * scale, plus twice the reference's own error at
    ``dtype`` (``at_dtype``); scale is the largest finite magnitude of exact and of ``magnitude``
    (the reference with every weight made positive). Where exact is NaN or infinite, got must be
    the same; and where the reference at ``dtype`` overflows, got must match it. ``value_dtype``:
    the value's dtype where it is not the input's (BCE: the target's, as torch)."""
    # a value rounded to a lower precision than the input's has that precision's tolerance, and so
    # has the gradient (its upstream gradient has the value's dtype)
    rtol, atol = max(TOLERANCES[dtype], TOLERANCES[value_dtype or dtype])
    for i, name in enumerate(("value", "input gradient")):
        want_dtype = value_dtype if i == 0 and value_dtype is not None else dtype
        g, e = got[i], exact[i].double()
        assert g.dtype == want_dtype and g.shape == e.shape, (what, name, g.dtype, g.shape, e.shape)
        g = g.double()
        scale = max(1.0, _finite_max(e), _finite_max(magnitude[i]))
        bound = atol * scale + rtol * e.abs()
        finite = torch.isfinite(e)
        if at_dtype is not None:
            a = at_dtype[i].double()
            bound = bound + 2 * torch.where(torch.isfinite(a), (a - e).abs(), torch.zeros_like(e))
            overflowed = finite & ~torch.isfinite(a)  # both at dtype: compare like specials
            e = torch.where(overflowed, a, e)
            finite = finite & ~overflowed
        same_special = (g == e) | (g.isnan() & e.isnan())
        ok = torch.where(finite, (g - e).abs() <= bound, same_special)
        if not ok.all():
            idx = tuple((~ok).nonzero()[0].tolist())
            raise AssertionError(
                f"{what}: {name} differs at {(~ok).sum().item()} of {ok.numel()} elements; first at "
                f"{idx}: got {g[idx].item()!r}, expected {e[idx].item()!r} (allowed {bound[idx].item():.3g})"
            )


def _run(fn, base, make_input, args, kwargs, upstream_seed=5, need_graph=False):
    """(value, gradient of the base) of ``fn(make_input(leaf), *args, **kwargs)``, or the exception.
    A result outside the autograd graph has a zero gradient; ``need_graph`` requires the graph (a
    loss without one breaks ``loss.backward()``)."""
    leaf = base.detach().clone().requires_grad_()
    try:
        out = fn(make_input(leaf), *args, **kwargs)
    except EXCEPTIONS as e:
        return e
    if not out.requires_grad:
        assert not need_graph, f"{fn.__module__}.{fn.__name__}: the result is not attached to the input's graph"
        return out.detach(), torch.zeros_like(leaf)
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = (torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype)
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    return out.detach(), grad


def _double(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _positive(v):
    return v.abs() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _inject_specials(base64, shape, layout, specials, dtype, row_size):
    """Write special logits into ``base64`` at the positions of view elements; ``row_-inf`` fills
    the whole sample (``row_size`` elements) that holds the element with -inf."""
    n = math.prod(shape)
    if not n or not specials:
        return
    where = storage_index(base64, shape, layout)
    # the largest magnitude the kernels promise float32 accuracy for (README); for logits of 1e30
    # see test_cross_entropy_gradient_of_logits_beyond_1e15
    huge = 6e4 if dtype == torch.float16 else 1e5
    for index, kind in specials:
        i = index % n
        if kind == "row_-inf" and row_size:
            first = (i // row_size) * row_size
            base64[where[first:first + row_size]] = -math.inf
        else:
            base64[where[i]] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": huge,
                                "-huge": -huge, "row_-inf": -math.inf}[kind]


def _names_an_argument(message: str, names) -> bool:
    return any(n in message for n in names)


# ---- cross-entropy --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CeCase:
    shape: Tuple[int, ...]  # (C,), (N, C) or (N, C, d1[, d2])
    dtype: str = "float64"
    layout: str = "contiguous"
    logit_specials: Tuple[Tuple[int, str], ...] = ()  # (flat index into the view, "nan" | "inf" | ...)
    scale: float = 3.0
    target_dtype: str = "int64"
    target_layout: str = "contiguous"
    target_specials: Tuple[Tuple[int, int], ...] = ()  # (flat index, value)
    ignore_index: int = -100
    weight: Optional[str] = None  # None, "nonnegative", "nonpositive", "mixed"
    weight_dtype: Optional[str] = None  # None: the input's
    weight_layout: str = "contiguous"
    sample_weight: Optional[str] = None
    sample_weight_layout: str = "contiguous"
    label_smoothing: float = 0.0
    class_weighting: Union[None, str, BatchWeighting] = None
    reduction: str = "mean"
    bad_argument: Optional[str] = None  # "weight" | "sample_weight" | "target": a wrong shape
    seed: int = 0


def _ce_geometry(shape):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    loss_shape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    return num_classes, loss_shape


def _weights_for(kind, shape, gen, dtype, layout):
    if kind is None:
        return None
    values = torch.tensor(WEIGHT_VALUES, dtype=torch.float64)
    w = values[torch.randint(0, len(WEIGHT_VALUES), shape, generator=gen)]
    if kind == "nonpositive":
        w = -w
    elif kind == "mixed":
        w = torch.where(torch.rand(shape, generator=gen) < 0.5, -w, w)
    if layout == "overlapping":  # elements share memory: the values are whatever the base holds
        base = new_base(shape, layout, dtype)
        base.copy_(w.reshape(-1)[: base.numel()] if w.numel() >= base.numel() else
                   values[torch.randint(0, len(WEIGHT_VALUES), base.shape, generator=gen)])
        return view_of(base, shape, layout)
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        w = w[:1].expand(shape)  # the values an expanded view will show
    return placed(w, layout, dtype)


def build_ce(case: CeCase):
    """(base, make_input, target, kwargs): the input is ``make_input(base)``, a view of ``base``."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    shape = tuple(case.shape)
    num_classes, loss_shape = _ce_geometry(shape)

    base64 = torch.randn(storage_size(shape, *layout_strides(shape, case.layout)), generator=gen,
                         dtype=torch.float64) * case.scale
    _inject_specials(base64, shape, case.layout, case.logit_specials, dtype,
                     row_size=num_classes * math.prod(shape[2:]) if len(shape) >= 2 else 0)
    base = base64.to(dtype)

    def make_input(b):
        return view_of(b, shape, case.layout)

    target_dtype = getattr(torch, case.target_dtype)
    tshape = loss_shape
    if case.bad_argument == "target":
        tshape = tuple(loss_shape) + (2,) if loss_shape else (2,)
    t = torch.randint(0, max(num_classes, 1), tshape, generator=gen)
    if num_classes == 0:
        t.fill_(case.ignore_index)
    flat = t.reshape(-1)
    for index, value in case.target_specials:
        if flat.numel():
            flat[index % flat.numel()] = value
    if case.target_layout == "expanded" and len(tshape) >= 1 and tshape[0] > 0:
        t = t[:1].expand(tshape)
    if target_dtype == torch.int32:
        t = t.clamp(INT32_MIN, INT32_MAX)
    target = placed(t, case.target_layout, target_dtype)

    kwargs = {"ignore_index": case.ignore_index, "reduction": case.reduction,
              "label_smoothing": case.label_smoothing, "class_weighting": case.class_weighting}
    wdtype = DTYPES[case.weight_dtype] if case.weight_dtype else dtype
    wshape = (num_classes + 1,) if case.bad_argument == "weight" else (num_classes,)
    w = _weights_for(case.weight or ("nonnegative" if case.bad_argument == "weight" else None), wshape, gen,
                     wdtype, case.weight_layout)
    if w is not None:
        kwargs["weight"] = w
    swshape = tuple(loss_shape) + (1,) if case.bad_argument == "sample_weight" else loss_shape
    sw = _weights_for(case.sample_weight or ("nonnegative" if case.bad_argument == "sample_weight" else None),
                      swshape, gen, wdtype, case.sample_weight_layout)
    if sw is not None:
        kwargs["sample_weight"] = sw
    return base, make_input, target, kwargs


def _torch_has_the_option(case: CeCase, kwargs) -> bool:
    return (case.sample_weight is None and case.class_weighting is None
            and case.reduction in ("none", "sum", "mean") and case.target_dtype == "int64"
            and case.bad_argument is None and case.weight_dtype is None
            and DTYPES[case.dtype] in (torch.float32, torch.float64))


CE_ARGUMENTS = ("input", "target", "weight", "sample_weight", "ignore_index", "label_smoothing",
                "reduction", "class_weighting")


def check_ce(case: CeCase) -> None:
    dtype = DTYPES[case.dtype]
    base, make_input, target, kwargs = build_ce(case)
    num_classes, _ = _ce_geometry(tuple(case.shape))
    before = [_bits(base), _bits(target)] + [_bits(v) for v in kwargs.values() if isinstance(v, torch.Tensor)]
    x = make_input(base)
    kernel = ops.ce_supported(x, target, kwargs.get("weight"), kwargs.get("sample_weight"), False)
    got = _run(fused_wloss.cross_entropy, base, make_input, (target,), kwargs, need_graph=True)
    reference_input = make_input
    if case.bad_argument is None:
        # ignored elements whose logits are not all finite: 0 for the reference (see the docstring)
        finite = torch.isfinite(x) if x.dim() == 1 else torch.isfinite(x).all(dim=1)
        if x.dim() == 1:
            finite = finite.all()
        cut = ((target.long() == case.ignore_index) & ~finite).unsqueeze(0 if x.dim() == 1 else 1).expand(x.shape)

        def reference_input(b):
            v = make_input(b)
            return torch.where(cut, torch.zeros((), dtype=v.dtype), v)

    expected = _run(reference.cross_entropy, base.double(), reference_input, (target,),
                    {k: _double(v) for k, v in kwargs.items()})
    after = [_bits(base), _bits(target)] + [_bits(v) for v in kwargs.values() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{case}: an argument was modified"

    flat_t = target.reshape(-1).long()
    out_of_range = bool((((flat_t < 0) | (flat_t >= num_classes)) & (flat_t != case.ignore_index)).any())
    what = f"cross_entropy {case} (served by the {'kernels' if kernel else 'reference'})"
    event(f"{'kernels' if kernel else 'reference'}: {type(got).__name__ if isinstance(got, Exception) else 'compared'}")
    if isinstance(got, Exception) or isinstance(expected, Exception):
        assert isinstance(got, Exception), f"{what}: the reference raised {expected!r}, the kernels did not"
        assert isinstance(expected, Exception), f"{what}: raised {got!r}, the reference did not"
        assert type(got) is type(expected), f"{what}: raised {got!r}, the reference {expected!r}"
        assert _names_an_argument(str(got), CE_ARGUMENTS), f"{what}: {got!r} names no argument"
        if case.bad_argument is not None:
            assert case.bad_argument in str(got), f"{what}: {got!r} does not name {case.bad_argument}"
        elif out_of_range:
            assert isinstance(got, IndexError) and "target" in str(got), f"{what}: {got!r}"
        else:
            raise AssertionError(f"{what}: a valid call raised {got!r}")
        return
    assert case.bad_argument is None, f"{what}: a {case.bad_argument} of the wrong shape was accepted"
    assert not out_of_range, f"{what}: an out-of-range target was accepted"
    at_dtype = None
    if dtype != torch.float64:
        at_dtype = _run(reference.cross_entropy, base, reference_input, (target,), kwargs)
    magnitude = _run(reference.cross_entropy, base.double(), reference_input, (target,),
                     {k: _positive(_double(v)) for k, v in kwargs.items()})
    assert_agree(got, expected, at_dtype, magnitude, dtype, what)
    if _torch_has_the_option(case, kwargs):
        torch_kwargs = {k: kwargs[k] for k in ("weight", "ignore_index", "reduction", "label_smoothing") if k in kwargs}
        theirs = _run(F.cross_entropy, base, make_input, (target,), torch_kwargs)
        if isinstance(theirs, Exception):
            # torch's own limit: it cannot run a K-dim input without classes ("size mismatch"),
            # where every target must be ignored and fused_wloss returns zeros, as the reference
            assert len(case.shape) > 2 and case.shape[1] == 0, f"{what}: torch raised {theirs!r}"
            return
        assert torch.equal(theirs[0].isnan(), got[0].isnan()), f"{what}: NaN where torch has none, or the reverse"


# ---- strategies: cross-entropy --------------------------------------------------------------------

LAYOUTS = ("contiguous", "offset", "strided", "reversed", "expanded", "overlapping")
REDUCTIONS = ("none", "sum", "mean", "sample_mean")
SCHEMES = ("inverse", "inverse_sqrt", "effective_number")
SPECIAL_LOGITS = ("nan", "inf", "-inf", "huge", "-huge", "row_-inf")


def _batch_weighting(balanced=st.just(False)):
    return st.builds(BatchWeighting, st.sampled_from(SCHEMES),
                     smoothing=st.sampled_from([1e-3, 0.5, 1.0, 1e3]),
                     beta=st.sampled_from([0.0, 0.5, 0.999, 0.9999999]), balanced=balanced)


@st.composite
def ce_shapes(draw):
    kind = draw(st.sampled_from(["small", "small", "small", "huge_c", "huge_n", "kdim", "unbatched"]))
    if kind == "unbatched":
        return (draw(st.sampled_from([0, 1, 2, 31, 32, 33, 1000])),)
    if kind == "huge_c":
        return (draw(st.integers(0, 2)), draw(st.sampled_from([1023, 4096, 65537])))
    if kind == "huge_n":
        return (draw(st.sampled_from([1000, 4097, 30000])), draw(st.integers(0, 3)))
    if kind == "kdim":
        c = draw(st.sampled_from([0, 1, 2, 5, 33]))
        spatial = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 17]), min_size=1, max_size=2)))
        return (draw(st.integers(0, 3)), c) + spatial
    return (draw(st.sampled_from([0, 1, 2, 5, 16, 17])), draw(st.sampled_from([0, 1, 2, 15, 16, 31, 32, 33, 70])))


def _boundary_targets(num_classes, ignore_index):
    values = {-1, 0, num_classes - 1, num_classes, num_classes + 1, ignore_index, ignore_index - 1,
              ignore_index + 1, INT64_MIN, INT64_MAX, INT32_MIN, INT32_MAX, 2**31, -(2**31) - 1, 2**32,
              2**32 + min(num_classes - 1, 0)}
    return sorted(v for v in values if INT64_MIN <= v <= INT64_MAX)


@st.composite
def ce_cases(draw):
    shape = draw(ce_shapes())
    num_classes, loss_shape = _ce_geometry(shape)
    ignore_index = draw(st.sampled_from([-100, -1, 0, max(num_classes - 1, 0), num_classes, INT64_MIN,
                                         INT64_MAX, INT32_MAX]))
    mode = draw(st.sampled_from(["valid", "valid", "ignored", "hostile"]))
    n_targets = math.prod(loss_shape)
    target_specials = ()
    if n_targets and mode != "valid":
        pool = [ignore_index] if mode == "ignored" else _boundary_targets(num_classes, ignore_index)
        target_specials = tuple(draw(st.lists(
            st.tuples(st.integers(0, n_targets - 1), st.sampled_from(pool)), min_size=1, max_size=4)))
    reduction = draw(st.sampled_from(REDUCTIONS))
    weight = draw(st.sampled_from([None, "nonnegative", "nonpositive", "mixed"]))
    sample_weight = draw(st.sampled_from([None, "nonnegative", "nonpositive", "mixed"]))
    if reduction == "mean" and "mixed" in (weight, sample_weight):
        reduction = "sum"  # see the module docstring
    if reduction == "mean" and {weight, sample_weight} == {"nonnegative", "nonpositive"}:
        sample_weight = "nonnegative"
        weight = "nonnegative"
    dtype = draw(st.sampled_from(["float64", "float64", "float32", "float16", "bfloat16"]))
    n_logits = math.prod(shape)
    return CeCase(
        shape=shape,
        dtype=dtype,
        layout=draw(st.sampled_from(LAYOUTS)),
        logit_specials=tuple(draw(st.lists(st.tuples(st.integers(0, max(n_logits - 1, 0)),
                                                     st.sampled_from(SPECIAL_LOGITS)), max_size=3)))
        if n_logits and draw(st.booleans()) else (),
        scale=draw(st.sampled_from([0.1, 3.0, 50.0])),
        target_dtype=draw(st.sampled_from(["int64", "int32"])),
        target_layout=draw(st.sampled_from(["contiguous", "strided", "reversed", "expanded"])),
        target_specials=target_specials,
        ignore_index=ignore_index,
        weight=weight,
        weight_dtype=draw(st.sampled_from([None, None, "float64", "float32"])),
        weight_layout=draw(st.sampled_from(["contiguous", "offset", "strided", "expanded"])),
        sample_weight=sample_weight,
        sample_weight_layout=draw(st.sampled_from(LAYOUTS)),
        # C = 0 with label smoothing: the kernels and the reference give 0 (no class, every target
        # ignored), torch NaN (eps / C): left out, as a documented difference
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 1e-7, 0.3, 1.0])) if num_classes else 0.0,
        class_weighting=draw(st.one_of(st.sampled_from([None, None, *SCHEMES]), _batch_weighting())),
        reduction=reduction,
        bad_argument=draw(st.sampled_from([None] * 8 + ["weight", "sample_weight", "target"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@_settings(default_examples=300)
@given(case=ce_cases())
@example(case=CeCase((3, 5), target_specials=((0, 5),)))  # target == C
@example(case=CeCase((3, 5), target_specials=((2, -1),), reduction="none"))  # target == -1, last row
@example(case=CeCase((2, 5), target_dtype="int32", target_specials=((1, INT32_MIN),)))
@example(case=CeCase((2, 5), target_specials=((1, INT64_MAX),), class_weighting="inverse"))
@example(case=CeCase((2, 5), ignore_index=INT64_MIN, target_specials=((0, INT64_MIN),), reduction="sum"))
@example(case=CeCase((4, 0), ignore_index=-1, target_specials=((0, -1), (1, -1), (2, -1), (3, -1))))  # C = 0
@example(case=CeCase((3, 40), logit_specials=((0, "row_-inf"), (50, "nan"), (90, "inf")), reduction="none"))
@example(case=CeCase((6, 33), layout="overlapping", label_smoothing=0.3, weight="nonnegative"))
@example(case=CeCase((2, 65537), weight="mixed", reduction="sum", class_weighting="inverse"))
@example(case=CeCase((30000, 2), sample_weight="nonpositive", dtype="bfloat16"))
@example(case=CeCase((1, 0, 1), scale=0.1, reduction="none"))  # fresh seed 777: torch raises here
def test_cross_entropy_hostile_input(case):
    check_ce(case)


# ---- binary cross-entropy -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BceCase:
    shape: Tuple[int, ...]  # rank 0..3; the last dimension holds the labels
    dtype: str = "float64"
    target_dtype: Optional[str] = None  # None: the input's (another dtype goes to the reference)
    layout: str = "contiguous"
    target_layout: str = "contiguous"
    logit_specials: Tuple[Tuple[int, str], ...] = ()
    target_kind: str = "hard"  # "hard" (0/1), "soft" ([0, 1]), "outside" ([-1, 2]), "nan"
    scale: float = 3.0
    weight: Optional[str] = None  # None, "label", "full", "row", "scalar", "expanded"
    weight_sign: str = "nonnegative"
    pos_weight: Optional[str] = None  # None, "label", "scalar", "broadcast"
    sample_weight: bool = False
    class_weighting: Union[None, str, BatchWeighting] = None
    reduction: str = "mean"
    bad_argument: Optional[str] = None  # "weight" | "pos_weight" | "sample_weight" | "target"
    seed: int = 0


def _bce_geometry(shape):
    labels = shape[-1:] if len(shape) >= 2 else (1,) if len(shape) == 1 else ()
    rows = shape[:-1] if len(shape) >= 2 else shape
    return labels, rows


def build_bce(case: BceCase):
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    shape = tuple(case.shape)
    labels, rows = _bce_geometry(shape)
    base64 = torch.randn(storage_size(shape, *layout_strides(shape, case.layout)), generator=gen,
                         dtype=torch.float64) * case.scale
    _inject_specials(base64, shape, case.layout, case.logit_specials, dtype,
                     row_size=shape[-1] if len(shape) >= 2 else 0)
    base = base64.to(dtype)

    def make_input(b):
        return view_of(b, shape, case.layout)

    tshape = shape + (2,) if case.bad_argument == "target" else shape
    t = torch.rand(tshape, generator=gen, dtype=torch.float64)
    if case.target_kind == "hard":
        t = (t < 0.4).double()
    elif case.target_kind == "outside":
        t = t * 3 - 1
    elif case.target_kind == "nan":
        t = torch.where(t < 0.2, math.nan, (t < 0.5).double())
    tdtype = DTYPES[case.target_dtype] if case.target_dtype else dtype
    if case.target_layout == "expanded" and tshape and tshape[0] > 0:
        t = t[:1].expand(tshape)
    target = placed(t, case.target_layout, tdtype)

    kwargs = {"reduction": case.reduction, "class_weighting": case.class_weighting}
    sign = case.weight_sign
    wshape = {"label": labels, "full": shape, "row": rows + (1,), "scalar": (), "expanded": labels}.get(case.weight)
    if case.bad_argument == "weight":
        wshape = (max(labels[0] if labels else 1, 1) + 1,) + (1,) * max(len(shape) - 1, 0) + (1,)
    if wshape is not None:
        w = _weights_for(sign, wshape, gen, dtype, "contiguous")
        kwargs["weight"] = w.expand(shape) if case.weight == "expanded" and case.bad_argument != "weight" else w
    pshape = {"label": labels, "scalar": (), "broadcast": (1,) * max(len(shape) - 1, 0) + labels}.get(case.pos_weight)
    if case.bad_argument == "pos_weight":
        pshape = (max(labels[0] if labels else 1, 1) + 2,)
    if pshape is not None:
        kwargs["pos_weight"] = _weights_for(sign, pshape, gen, dtype, "strided" if pshape else "contiguous")
    if case.sample_weight or case.bad_argument == "sample_weight":
        swshape = rows + (3,) if case.bad_argument == "sample_weight" else rows
        kwargs["sample_weight"] = _weights_for(sign, swshape, gen, dtype, "offset")
    return base, make_input, target, kwargs


BCE_ARGUMENTS = ("input", "target", "weight", "pos_weight", "sample_weight", "reduction", "class_weighting")


def check_bce(case: BceCase) -> None:
    dtype = DTYPES[case.dtype]
    base, make_input, target, kwargs = build_bce(case)
    before = [_bits(base), _bits(target)] + [_bits(v) for v in kwargs.values() if isinstance(v, torch.Tensor)]
    x = make_input(base)
    kernel = ops.bce_supported(x, target, kwargs.get("weight"), kwargs.get("pos_weight"), kwargs.get("sample_weight"))
    fn = fused_wloss.binary_cross_entropy_with_logits
    got = _run(fn, base, make_input, (target,), kwargs, need_graph=True)
    expected = _run(reference.binary_cross_entropy_with_logits, base.double(), make_input, (target.double(),),
                    {k: _double(v) for k, v in kwargs.items()})
    after = [_bits(base), _bits(target)] + [_bits(v) for v in kwargs.values() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{case}: an argument was modified"
    what = f"binary_cross_entropy_with_logits {case} (served by the {'kernels' if kernel else 'reference'})"
    event(f"{'kernels' if kernel else 'reference'}: {type(got).__name__ if isinstance(got, Exception) else 'compared'}")
    if isinstance(got, Exception) or isinstance(expected, Exception):
        assert isinstance(got, Exception), f"{what}: the reference raised {expected!r}, the kernels did not"
        assert isinstance(expected, Exception), f"{what}: raised {got!r}, the reference did not"
        assert type(got) is type(expected), f"{what}: raised {got!r}, the reference {expected!r}"
        assert case.bad_argument is not None, f"{what}: a valid call raised {got!r}"
        assert case.bad_argument in str(got), f"{what}: {got!r} does not name {case.bad_argument}"
        return
    assert case.bad_argument is None, f"{what}: a {case.bad_argument} of the wrong shape was accepted"
    at_dtype = None
    if dtype != torch.float64:
        at_dtype = _run(reference.binary_cross_entropy_with_logits, base, make_input, (target,), kwargs)
    magnitude = _run(reference.binary_cross_entropy_with_logits, base.double(), make_input, (target.double(),),
                     {k: _positive(_double(v)) for k, v in kwargs.items()})
    assert_agree(got, expected, at_dtype, magnitude, dtype, what, value_dtype=target.dtype)
    if case.target_dtype is not None:  # the value's dtype is the target's, as torch's
        theirs = _run(F.binary_cross_entropy_with_logits, base, make_input, (target,), {"reduction": case.reduction})
        assert isinstance(theirs, Exception) or theirs[0].dtype == got[0].dtype, (what, theirs[0].dtype, got[0].dtype)
    if (case.sample_weight is False and case.class_weighting is None and case.reduction != "sample_mean"
            and case.target_dtype is None and dtype in (torch.float32, torch.float64)):
        torch_kwargs = {k: kwargs[k] for k in ("weight", "pos_weight", "reduction") if k in kwargs}
        theirs = _run(F.binary_cross_entropy_with_logits, base, make_input, (target,), torch_kwargs)
        assert not isinstance(theirs, Exception), f"{what}: torch raised {theirs!r}"
        assert torch.equal(theirs[0].isnan(), got[0].isnan()), f"{what}: NaN where torch has none, or the reverse"


@st.composite
def bce_shapes(draw):
    kind = draw(st.sampled_from(["small", "small", "small", "huge_l", "huge_rows", "rank3", "low_rank"]))
    if kind == "low_rank":
        return tuple(draw(st.lists(st.sampled_from([0, 1, 2, 17, 20000]), max_size=1)))
    if kind == "huge_l":
        return (draw(st.integers(0, 2)), draw(st.sampled_from([1023, 65537])))
    if kind == "huge_rows":
        return (draw(st.sampled_from([4097, 30000])), draw(st.integers(0, 3)))
    if kind == "rank3":
        return tuple(draw(st.lists(st.sampled_from([0, 1, 2, 7]), min_size=3, max_size=3)))
    return (draw(st.sampled_from([0, 1, 2, 5, 16, 17])), draw(st.sampled_from([0, 1, 2, 15, 16, 33])))


@st.composite
def bce_cases(draw):
    shape = draw(bce_shapes())
    n = math.prod(shape)
    weights = [None, "label", "full", "scalar", "expanded"] + (["row"] if len(shape) >= 2 else [])
    return BceCase(
        shape=shape,
        dtype=draw(st.sampled_from(["float64", "float64", "float32", "float16", "bfloat16"])),
        target_dtype=draw(st.sampled_from([None] * 6 + ["float64", "float32"])),
        layout=draw(st.sampled_from(LAYOUTS)),
        target_layout=draw(st.sampled_from(["contiguous", "strided", "reversed", "expanded"])),
        logit_specials=tuple(draw(st.lists(st.tuples(st.integers(0, max(n - 1, 0)),
                                                     st.sampled_from(SPECIAL_LOGITS)), max_size=3)))
        if n and draw(st.booleans()) else (),
        target_kind=draw(st.sampled_from(["hard", "hard", "soft", "outside", "nan"])),
        scale=draw(st.sampled_from([0.1, 3.0, 50.0])),
        weight=draw(st.sampled_from(weights)),
        weight_sign=draw(st.sampled_from(["nonnegative", "nonpositive", "mixed"])),
        pos_weight=draw(st.sampled_from([None, "label", "scalar", "broadcast"])),
        sample_weight=draw(st.booleans()),
        class_weighting=draw(st.one_of(st.sampled_from([None, None, "inverse", "balanced"]),
                                       _batch_weighting(st.booleans()))),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        bad_argument=draw(st.sampled_from([None] * 8 + ["weight", "pos_weight", "sample_weight", "target"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@_settings(default_examples=300)
@given(case=bce_cases())
@example(case=BceCase((), logit_specials=((0, "nan"),)))
@example(case=BceCase((3, 0), class_weighting="balanced", sample_weight=True))
@example(case=BceCase((4, 5), target_kind="outside", class_weighting="inverse", reduction="none"))
@example(case=BceCase((4, 5), target_kind="nan", class_weighting="balanced", pos_weight="label"))
@example(case=BceCase((2, 65537), weight="label", weight_sign="mixed", reduction="sum"))
@example(case=BceCase((30000, 3), layout="overlapping", weight="row", dtype="bfloat16"))
# found with fresh seeds (issue 16): a far-negative logit under a dynamic weight of 1000 (the
# element formula cancelled two products of size 1e8), and -inf with a soft target (NaN in torch)
@example(case=BceCase((1, 1), dtype="float32", logit_specials=((0, "-huge"),), target_kind="hard",
                      class_weighting=BatchWeighting("inverse", smoothing=0.001), reduction="none", seed=1))
@example(case=BceCase((1, 1), logit_specials=((0, "-inf"),), target_kind="soft", scale=0.1, reduction="none"))
@example(case=BceCase((1, 1023), dtype="float16", target_kind="outside", class_weighting="inverse", reduction="none"))
# fresh seeds 1 and 777: -inf logits with targets outside [0, 1] (torch: inf for t > 1, else NaN)
@example(case=BceCase((1, 2), logit_specials=((0, "row_-inf"),), target_kind="outside", scale=0.1, reduction="none"))
@example(case=BceCase((1, 15), logit_specials=((0, "-inf"),), target_kind="outside", scale=0.1, reduction="none",
                      seed=65))
# fresh seed 71207: effective_number at beta = 0.9999999 formed in float32 (beta rounds to 0.99999988,
# 1 - beta moves by 19%): the weight of a label seen thousands of times off by 1e-4
@example(case=BceCase((30000, 1), dtype="float32", logit_specials=((0, "huge"),), target_kind="hard", scale=0.1,
                      class_weighting=BatchWeighting("effective_number", smoothing=0.001, beta=0.9999999),
                      reduction="none"))
def test_bce_hostile_input(case):
    check_bce(case)


@pytest.mark.parametrize("shape", [(1, 2), (3, 40), (4, 5, 3)], ids=["rows-2", "rows-40", "kdim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cross_entropy_gradient_of_logits_beyond_1e15(dtype, shape):
    """Rows of logits 1e30 and 1e29: the softmax shares the row equally among its 1e30 classes,
    whatever their size. max + log(sum) rounds to max beyond about 1e15 in float64, so the forward
    saves the lse as hi + lo (split_lse) with log(sum) in lo there (the backward used to give
    (0, 1) for two logits of 1e30, as if log(sum) were 0)."""
    x = torch.full(shape, 1e30, dtype=dtype)
    x[:, 1::3] = 1e29
    x.requires_grad_()
    t = torch.arange(shape[0] * math.prod(shape[2:])).reshape((shape[0],) + shape[2:]) % shape[1]
    (ours,) = torch.autograd.grad(fused_wloss.cross_entropy(x, t), x)
    (theirs,) = torch.autograd.grad(F.cross_entropy(x, t), x)
    torch.testing.assert_close(ours, theirs)
