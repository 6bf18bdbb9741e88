"""Bad input and degenerate input, for every implementation (the public functions and the reference).

Every bad argument must raise a Python exception whose message names the argument and says what
was expected; degenerate but valid input (empty batches, every target ignored) must not raise and
must give torch's answer (NaN for an empty mean, 0 for an empty sum) with finite gradients.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import BatchWeighting

CE = "cross_entropy: "
BCE = "binary_cross_entropy_with_logits: "
SCHEMES = ["inverse", "inverse_sqrt", "effective_number", BatchWeighting("effective_number", beta=0.0)]


def _shape(*dims):
    """The regex of a shape as the messages print it: ``(2, 3)``, ``()``, and ``(4,)`` or ``(4)``."""
    if len(dims) == 1:
        return rf"\({dims[0]},?\)"
    return re.escape(str(tuple(dims)))


def _logits(*shape, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _weights(*shape, low=0.1):
    """Seeded weights in [low, low + 1)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + low


def _index_target(shape, num_classes=5):
    return torch.randint(0, num_classes, shape, generator=torch.Generator().manual_seed(1))


def _value_and_grad(fn, input, *args, **kwargs):
    """``fn(input, ...)`` and the gradient of ``out.sum()`` with respect to a fresh leaf input."""
    x = input.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


def _assert_torch_like(actual, expected):
    torch.testing.assert_close(actual, expected, equal_nan=True)


@pytest.fixture
def no_target_validation():
    fused_wloss.set_target_validation(False)
    try:
        yield
    finally:
        fused_wloss.set_target_validation(True)


# --------------------------------------------------------------------------------------------------
# cross_entropy: input and target


INDEX4 = torch.zeros(4, dtype=torch.long)
ZERO_D = r"input must have shape \(C,\), \(N, C\) or \(N, C, d1, ..., dk\), got a 0-d tensor"


@pytest.mark.parametrize(
    "input, target, exc, match",
    [
        (torch.randint(0, 3, (4, 5)), INDEX4, TypeError, r"input \(logits\) must be a floating-point tensor.*int64"),
        (torch.zeros(4, 5, dtype=torch.bool), INDEX4, TypeError, r"input \(logits\) must be a floating-point.*bool"),
        ([[0.0] * 5] * 4, INDEX4, TypeError, "input must be a torch.Tensor, got list"),
        (torch.tensor(1.0), torch.tensor(0), ValueError, ZERO_D),
        (torch.tensor(1.0), torch.tensor(1.0), ValueError, ZERO_D),
    ],
    ids=["int64", "bool", "list", "0-d", "0-d-probability"],
)
def test_cross_entropy_bad_input(ce_impl, input, target, exc, match):
    with pytest.raises(exc, match=CE + match):
        ce_impl(input, target)


@pytest.mark.parametrize(
    "input_shape, target_shape",
    [
        ((4, 5), (4, 1)),
        ((4, 5), (5,)),
        ((4, 5), (1, 4)),
        ((4, 5), ()),
        ((4, 5), (4, 5)),  # one-hot integers are not probabilities
        ((2, 5, 3), (2,)),
        ((2, 5, 3), (3, 2)),
        ((2, 5, 3), (2, 5, 3)),
        ((5,), (1,)),
    ],
    ids=str,
)
def test_cross_entropy_index_target_shape(ce_impl, input_shape, target_shape):
    expected = input_shape[:1] + input_shape[2:] if len(input_shape) > 1 else ()
    with pytest.raises(ValueError, match=CE + "a class-index target must have shape " + _shape(*expected)):
        ce_impl(_logits(*input_shape), torch.zeros(target_shape, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int16, torch.int8], ids=str)
def test_cross_entropy_target_dtype(ce_impl, dtype):
    with pytest.raises(TypeError, match=CE + r"target must hold class indices \(int64 or int32\).*" + str(dtype)):
        ce_impl(_logits(4, 5), torch.zeros(4, dtype=dtype))


def test_cross_entropy_target_not_a_tensor(ce_impl):
    with pytest.raises(TypeError, match=CE + "target must be a torch.Tensor, got list"):
        ce_impl(_logits(4, 5), [0, 1, 2, 3])


@pytest.mark.parametrize(
    "input_shape, target_shape",
    [((4, 5), (4,)), ((4, 5), (4, 6)), ((4, 5), (5, 4)), ((2, 5, 3), (2, 3)), ((5,), ())],
    ids=str,
)
def test_cross_entropy_probability_target_shape(ce_impl, input_shape, target_shape):
    match = CE + "a floating-point target holds class probabilities and must have the input's shape "
    match += _shape(*input_shape) + ", got " + _shape(*target_shape)
    with pytest.raises(ValueError, match=match):
        ce_impl(_logits(*input_shape), torch.rand(target_shape, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# cross_entropy: class-index range

OUT_OF_RANGE_INT64 = [5, 10, -1, -5, 2**40, 2**31, -(2**31) - 1, 2**32 + 3, 2**32 - 100, 2**63 - 1, -(2**63)]
OUT_OF_RANGE_INT32 = [5, 10, -1, -5, 2**31 - 1, -(2**31)]


def _with_bad(bad, dtype, shape=(4,)):
    target = torch.zeros(shape, dtype=torch.long).flatten()
    target[:] = torch.arange(target.numel()) % 5
    target[min(2, target.numel() - 1)] = bad
    return target.reshape(shape).to(dtype)


@pytest.mark.parametrize(
    "bad, dtype",
    [(b, torch.int64) for b in OUT_OF_RANGE_INT64] + [(b, torch.int32) for b in OUT_OF_RANGE_INT32],
    ids=lambda v: str(v).replace("torch.", ""),
)
@pytest.mark.parametrize(
    "extra",
    [{}, {"class_weighting": "inverse"}, {"label_smoothing": 0.1, "weight": torch.ones(5, dtype=torch.float64)}],
    ids=["plain", "dynamic", "smoothed"],
)
def test_cross_entropy_target_out_of_range(ce_impl, bad, dtype, extra):
    # 2**32 + 3 and 2**32 - 100 would alias class 3 and ignore_index -100 if truncated to 32 bits.
    match = CE + r"target must hold class indices in \[0, 5\) or ignore_index=-100, found " + str(bad) + r" at element \d+$"
    with pytest.raises(IndexError, match=match):
        ce_impl(_logits(4, 5), _with_bad(bad, dtype), **extra)


@pytest.mark.parametrize(
    "input_shape, target_shape", [((5,), ()), ((2, 5, 3), (2, 3))], ids=["unbatched", "spatial"]
)
def test_cross_entropy_target_out_of_range_other_layouts(ce_impl, input_shape, target_shape):
    with pytest.raises(IndexError, match=CE + r"target must hold class indices in \[0, 5\).*found 7 at element \d+$"):
        ce_impl(_logits(*input_shape), _with_bad(7, torch.long, target_shape))


def test_cross_entropy_only_ignore_index_may_be_out_of_range(ce_impl):
    match = CE + r"target must hold class indices in \[0, 5\) or ignore_index=7, found -1 at element 2$"
    with pytest.raises(IndexError, match=match):
        ce_impl(_logits(4, 5), torch.tensor([0, 7, -1, 3]), ignore_index=7)


@pytest.mark.parametrize(
    "ignore_index, target, dtype",
    [
        (7, [0, 7, 4, 7], torch.int64),
        (-1, [-1, 2, 4, 1], torch.int64),
        (-1, [-1, 2, 4, 1], torch.int32),
        (-100, [3, -100, -100, 1], torch.int32),
        (2**40, [2**40, 2, 4, 2**40], torch.int64),
        (2, [0, 2, 4, 2], torch.int64),  # an in-range ignore_index
    ],
    ids=["7", "-1", "-1-int32", "-100-int32", "2**40", "in-range"],
)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    "extra", [{}, {"weight": _weights(5), "label_smoothing": 0.2}], ids=["plain", "weighted"]
)
def test_cross_entropy_ignore_index_matches_torch(ce_impl, ignore_index, target, dtype, reduction, extra):
    x, t = _logits(4, 5), torch.tensor(target, dtype=dtype)
    kwargs = dict(extra, ignore_index=ignore_index, reduction=reduction)
    out, grad = _value_and_grad(ce_impl, x, t, **kwargs)
    expected, expected_grad = _value_and_grad(F.cross_entropy, x, t.long(), **kwargs)
    _assert_torch_like(out, expected)
    _assert_torch_like(grad, expected_grad)


@pytest.mark.parametrize("bad", [5, -5, 2**40, -1], ids=str)
@pytest.mark.parametrize(
    "extra", [{}, {"class_weighting": "inverse"}, {"label_smoothing": 0.1}], ids=["plain", "dynamic", "smoothed"]
)
def test_target_validation_off_still_fails_loudly(ce_impl, no_target_validation, bad, extra):
    assert not fused_wloss.target_validation_enabled()
    # Without our check the failure comes from torch's indexing (or the kernels' own check).
    with pytest.raises((RuntimeError, IndexError), match=r"out of bounds|out of range|target"):
        ce_impl(_logits(4, 5), _with_bad(bad, torch.long))


# --------------------------------------------------------------------------------------------------
# cross_entropy: the other arguments


@pytest.mark.parametrize(
    "weight, exc, match",
    [
        (torch.ones(4), ValueError, r"weight must have shape \(5,\), one weight per class, got \(4\)"),
        (torch.ones(6), ValueError, r"weight must have shape \(5,\).*got \(6\)"),
        (torch.ones(1, 5), ValueError, r"weight must have shape \(5,\).*got \(1, 5\)"),
        (torch.tensor(1.0), ValueError, r"weight must have shape \(5,\).*got \(\)"),
        (torch.ones(5, dtype=torch.long), TypeError, r"weight must be a floating-point tensor, got torch.int64"),
        ([1.0] * 5, TypeError, r"weight must be a torch.Tensor or None, got list"),
    ],
    ids=["short", "long", "2-d", "0-d", "int64", "list"],
)
def test_cross_entropy_bad_weight(ce_impl, weight, exc, match):
    with pytest.raises(exc, match=CE + match):
        ce_impl(_logits(4, 5).float(), _index_target((4,)), weight=weight)


@pytest.mark.parametrize(
    "input_shape, sw_shape",
    [
        ((4, 5), (4, 1)),
        ((4, 5), (5,)),
        ((4, 5), (1,)),
        ((4, 5), ()),
        ((4, 5), (4, 5)),
        ((2, 5, 3), (2,)),
        ((2, 5, 3), (2, 3, 1)),
        ((2, 5, 3), (3,)),
        ((5,), (1,)),
    ],
    ids=str,
)
def test_cross_entropy_bad_sample_weight_shape(ce_impl, input_shape, sw_shape):
    loss_shape = input_shape[:1] + input_shape[2:] if len(input_shape) > 1 else ()
    match = CE + "sample_weight must have the shape of the unreduced loss " + _shape(*loss_shape)
    with pytest.raises(ValueError, match=match):
        sample_weight = torch.ones(sw_shape, dtype=torch.float64)
        ce_impl(_logits(*input_shape), _index_target(loss_shape), sample_weight=sample_weight)


def test_cross_entropy_sample_weight_dtype(ce_impl):
    with pytest.raises(TypeError, match=CE + "sample_weight must be a floating-point tensor, got torch.int64"):
        ce_impl(_logits(4, 5), _index_target((4,)), sample_weight=torch.ones(4, dtype=torch.long))


def test_cross_entropy_sample_weight_probability_target(ce_impl):
    target, sample_weight = torch.rand(4, 5, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=CE + "sample_weight must have the shape of the unreduced loss " + _shape(4)):
        ce_impl(_logits(4, 5), target, sample_weight=sample_weight)


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.0001, 2, math.nan, math.inf, -math.inf], ids=str)
def test_cross_entropy_bad_label_smoothing(ce_impl, label_smoothing):
    match = CE + r"label_smoothing must be in \[0.0, 1.0\], got " + re.escape(repr(label_smoothing))
    with pytest.raises(ValueError, match=match):
        ce_impl(_logits(4, 5), _index_target((4,)), label_smoothing=label_smoothing)


@pytest.mark.parametrize("reduction", ["avg", "", "MEAN", None], ids=repr)
def test_cross_entropy_bad_reduction(ce_impl, reduction):
    match = CE + r"reduction must be one of \('none', 'mean', 'sum', 'sample_mean'\), got " + re.escape(repr(reduction))
    with pytest.raises(ValueError, match=match):
        ce_impl(_logits(4, 5), _index_target((4,)), reduction=reduction)


@pytest.mark.parametrize("ignore_index", [1.5, 7.0, "x", None, True, torch.tensor(3)], ids=repr)
def test_cross_entropy_ignore_index_not_an_int(ce_impl, ignore_index):
    with pytest.raises(TypeError, match=CE + "ignore_index must be an int, got " + type(ignore_index).__name__):
        ce_impl(_logits(4, 5), _index_target((4,)), ignore_index=ignore_index)


@pytest.mark.parametrize("ignore_index", [2**63, 2**70, -(2**63) - 1], ids=str)
def test_cross_entropy_ignore_index_beyond_int64(ce_impl, ignore_index):
    with pytest.raises(ValueError, match=CE + r"ignore_index must fit in int64, got " + str(ignore_index)):
        ce_impl(_logits(4, 5), torch.tensor([0, 1, 2, -(2**63)]), ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------------
# class_weighting, shared by both losses

LOSSES = ["ce", "bce"]


def _call(loss, ce_impl, bce_impl, **kwargs):
    if loss == "ce":
        return ce_impl(_logits(4, 5), _index_target((4,)), **kwargs)
    return bce_impl(_logits(4, 5), torch.rand(4, 5, dtype=torch.float64), **kwargs)


def _prefix(loss):
    return CE if loss == "ce" else BCE


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("class_weighting", ["nope", "Inverse", "", "sqrt"], ids=repr)
def test_unknown_class_weighting(ce_impl, bce_impl, loss, class_weighting):
    match = _prefix(loss) + "class_weighting must be None, a BatchWeighting or one of .*'inverse'.*got "
    match += re.escape(repr(class_weighting))
    with pytest.raises(ValueError, match=match):
        _call(loss, ce_impl, bce_impl, class_weighting=class_weighting)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "class_weighting", [3, 1.0, True, ["inverse"], torch.ones(5), BatchWeighting], ids=lambda v: type(v).__name__
)
def test_class_weighting_wrong_type(ce_impl, bce_impl, loss, class_weighting):
    match = _prefix(loss) + "class_weighting must be None, a str or a fused_wloss.BatchWeighting, got "
    match += type(class_weighting).__name__
    with pytest.raises(TypeError, match=match):
        _call(loss, ce_impl, bce_impl, class_weighting=class_weighting)


@pytest.mark.parametrize(
    "class_weighting", ["balanced", BatchWeighting("inverse_sqrt", balanced=True)], ids=["str", "BatchWeighting"]
)
def test_balanced_is_for_bce_only(ce_impl, bce_impl, class_weighting):
    with pytest.raises(ValueError, match=CE + "class_weighting 'balanced'.*binary_cross_entropy_with_logits only"):
        _call("ce", ce_impl, bce_impl, class_weighting=class_weighting)
    _call("bce", ce_impl, bce_impl, class_weighting=class_weighting)  # fine there


@pytest.mark.parametrize("scheme", ["nope", "balanced", "Inverse", ""], ids=repr)
def test_batch_weighting_unknown_scheme(scheme):
    match = r"BatchWeighting: scheme must be one of \['effective_number', 'inverse', 'inverse_sqrt'\], got "
    with pytest.raises(ValueError, match=match + re.escape(repr(scheme))):
        BatchWeighting(scheme)


@pytest.mark.parametrize("smoothing", [0, 0.0, -1.0, math.inf, math.nan], ids=repr)
def test_batch_weighting_bad_smoothing(smoothing):
    match = r"BatchWeighting: smoothing must be a finite number >= 1.18e-38.*got " + re.escape(repr(smoothing))
    with pytest.raises(ValueError, match=match):
        BatchWeighting("inverse", smoothing=smoothing)


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, math.nan], ids=repr)
def test_batch_weighting_bad_beta(beta):
    with pytest.raises(ValueError, match=r"BatchWeighting: beta must be in \[0, 1\), got " + re.escape(repr(beta))):
        BatchWeighting("effective_number", beta=beta)


# --------------------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits


@pytest.mark.parametrize(
    "input_shape, target_shape",
    [((4, 3), (4,)), ((4, 3), (3, 4)), ((4, 3), (4, 3, 1)), ((4,), (4, 1)), ((), (1,))],
    ids=str,
)
def test_bce_target_shape(bce_impl, input_shape, target_shape):
    match = BCE + "target must have the input's shape " + _shape(*input_shape) + ", got " + _shape(*target_shape)
    with pytest.raises(ValueError, match=match):
        bce_impl(_logits(*input_shape), torch.rand(target_shape, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_bce_integer_target(bce_impl, dtype):
    match = BCE + "target must be a floating-point tensor of 0/1 labels or probabilities, got " + str(dtype)
    with pytest.raises(TypeError, match=match):
        bce_impl(_logits(4, 3), torch.ones(4, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=str)
def test_bce_integer_logits(bce_impl, dtype):
    with pytest.raises(TypeError, match=BCE + r"input \(logits\) must be a floating-point tensor.*got " + str(dtype)):
        bce_impl(torch.ones(4, 3, dtype=dtype), torch.rand(4, 3))


@pytest.mark.parametrize("name", ["weight", "pos_weight"])
@pytest.mark.parametrize("shape", [(4,), (2,), (5, 3), (2, 4, 3)], ids=str)
def test_bce_weight_not_broadcastable(bce_impl, name, shape):
    # (4,) and (2,) do not broadcast against (4, 3); (2, 4, 3) broadcasts but would grow the loss.
    match = BCE + name + " must be broadcastable to the input's shape " + _shape(4, 3)
    match += r" \(.*\), got " + _shape(*shape)
    kwargs = {name: torch.ones(shape, dtype=torch.float64)}
    with pytest.raises(ValueError, match=match):
        bce_impl(_logits(4, 3), torch.rand(4, 3, dtype=torch.float64), **kwargs)


@pytest.mark.parametrize("name", ["weight", "pos_weight", "sample_weight"])
def test_bce_integer_weights(bce_impl, name):
    shape = (4,) if name == "sample_weight" else (3,)
    kwargs = {name: torch.ones(shape, dtype=torch.long)}
    with pytest.raises(TypeError, match=BCE + name + " must be a floating-point tensor, got torch.int64"):
        bce_impl(_logits(4, 3), torch.rand(4, 3, dtype=torch.float64), **kwargs)


@pytest.mark.parametrize(
    "input_shape, sw_shape",
    [
        ((4, 3), (4, 3)),
        ((4, 3), (3,)),
        ((4, 3), (4, 1)),
        ((4, 3), (1,)),
        ((4, 3), ()),
        ((2, 4, 3), (2,)),
        ((2, 4, 3), (4,)),
        ((2, 4, 3), (2, 4, 1)),
        ((4,), (4, 1)),
        ((4,), (1,)),
        ((4,), ()),
        ((), (1,)),
    ],
    ids=str,
)
def test_bce_bad_sample_weight_shape(bce_impl, input_shape, sw_shape):
    rows = input_shape[:-1] if len(input_shape) >= 2 else input_shape
    match = BCE + "sample_weight must hold one weight per sample, shape " + _shape(*rows)
    match += r" \(the input's shape without its last, label dimension\), got " + _shape(*sw_shape)
    target, sample_weight = torch.rand(input_shape, dtype=torch.float64), torch.ones(sw_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        bce_impl(_logits(*input_shape), target, sample_weight=sample_weight)


@pytest.mark.parametrize("reduction", ["avg", "", "batchmean", None], ids=repr)
def test_bce_bad_reduction(bce_impl, reduction):
    match = BCE + r"reduction must be one of \(.*'sample_mean'\), got " + re.escape(repr(reduction))
    with pytest.raises(ValueError, match=match):
        bce_impl(_logits(4, 3), torch.rand(4, 3, dtype=torch.float64), reduction=reduction)


# --------------------------------------------------------------------------------------------------
# Devices (the meta device stands in for a second device on any machine)


@pytest.mark.parametrize(
    "name, value",
    [
        ("target", torch.zeros(4, dtype=torch.long, device="meta")),
        ("weight", torch.ones(5, dtype=torch.float64, device="meta")),
        ("sample_weight", torch.ones(4, dtype=torch.float64, device="meta")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_cross_entropy_device_mismatch(ce_impl, name, value):
    args = {"target": _index_target((4,)), name: value}
    with pytest.raises(ValueError, match=CE + name + r" must be on the input's device cpu, got meta"):
        ce_impl(_logits(4, 5), **args)


def test_cross_entropy_device_mismatch_meta_input(ce_impl):
    with pytest.raises(ValueError, match=CE + r"target must be on the input's device meta, got cpu"):
        ce_impl(_logits(4, 5).to("meta"), _index_target((4,)))


@pytest.mark.parametrize("name", ["target", "weight", "pos_weight", "sample_weight"])
def test_bce_device_mismatch(bce_impl, name):
    shapes = {"target": (4, 3), "weight": (3,), "pos_weight": (3,), "sample_weight": (4,)}
    args = {"target": torch.rand(4, 3, dtype=torch.float64)}
    args[name] = torch.ones(shapes[name], dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=BCE + name + r" must be on the input's device cpu, got meta"):
        bce_impl(_logits(4, 3), **args)


# --------------------------------------------------------------------------------------------------
# Modules


def test_cross_entropy_module_unknown_class_weighting():
    with pytest.raises(ValueError, match=CE + "class_weighting must be None, a BatchWeighting or one of .*'nope'"):
        fused_wloss.CrossEntropyLoss(class_weighting="nope")


def test_cross_entropy_module_balanced():
    with pytest.raises(ValueError, match=CE + "class_weighting 'balanced'"):
        fused_wloss.CrossEntropyLoss(class_weighting="balanced")


def test_bce_module_class_weighting_wrong_type():
    with pytest.raises(TypeError, match=BCE + "class_weighting must be None, a str or .*BatchWeighting, got int"):
        fused_wloss.BCEWithLogitsLoss(class_weighting=3)


def test_bce_module_unknown_class_weighting():
    with pytest.raises(ValueError, match=BCE + "class_weighting must be None, a BatchWeighting or one of .*'nope'"):
        fused_wloss.BCEWithLogitsLoss(class_weighting="nope")


def test_module_bad_reduction_raises_on_call():
    # torch's constructors do not check ``reduction``; the call must.
    with pytest.raises(ValueError, match=CE + "reduction must be one of .*got 'avg'"):
        fused_wloss.CrossEntropyLoss(reduction="avg")(_logits(4, 5), _index_target((4,)))
    with pytest.raises(ValueError, match=BCE + "reduction must be one of .*got 'avg'"):
        fused_wloss.BCEWithLogitsLoss(reduction="avg")(_logits(4, 3), torch.rand(4, 3, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Degenerate input: must not raise, must match torch

TORCH_REDUCTIONS = ["none", "sum", "mean"]


def _torch_reduction(reduction):
    return "mean" if reduction == "sample_mean" else reduction


CE_EMPTY = {
    "index": ((0, 5), lambda: torch.zeros(0, dtype=torch.long), {}),
    "index-spatial": ((0, 5, 3), lambda: torch.zeros(0, 3, dtype=torch.long), {}),
    "index-spatial-empty-d": ((2, 5, 0), lambda: torch.zeros(2, 0, dtype=torch.long), {}),
    "index-weighted-smoothed": (
        (0, 5), lambda: torch.zeros(0, dtype=torch.long), {"weight": _weights(5), "label_smoothing": 0.1}
    ),
    "probability": ((0, 5), lambda: torch.zeros(0, 5, dtype=torch.float64), {}),
    "probability-smoothed": ((0, 5), lambda: torch.zeros(0, 5, dtype=torch.float64), {"label_smoothing": 0.3}),
}


@pytest.mark.parametrize("case", sorted(CE_EMPTY))
@pytest.mark.parametrize("reduction", TORCH_REDUCTIONS + ["sample_mean"])
@pytest.mark.parametrize(
    "extra", [{}, {"class_weighting": "inverse"}, {"sample_weight": True}], ids=["plain", "dynamic", "sample_weight"]
)
def test_cross_entropy_empty_batch(ce_impl, case, reduction, extra):
    input_shape, make_target, kwargs = CE_EMPTY[case]
    x, t = _logits(*input_shape), make_target()
    expected, _ = _value_and_grad(F.cross_entropy, x, t, reduction=_torch_reduction(reduction), **kwargs)
    if extra.get("sample_weight"):
        loss_shape = input_shape[:1] + input_shape[2:]
        extra = {"sample_weight": torch.ones(loss_shape, dtype=torch.float64)}
    out, grad = _value_and_grad(ce_impl, x, t, reduction=reduction, **kwargs, **extra)
    _assert_torch_like(out, expected)  # NaN for the means, 0 for "sum", an empty "none"
    assert grad.shape == x.shape


BCE_EMPTY = {
    "1-d": ((0,), {}),
    "2-d": ((0, 3), {}),
    "3-d": ((2, 0, 3), {}),
    "weights": ((0, 3), {"weight": _weights(3), "pos_weight": _weights(3, low=0.5)}),
}


@pytest.mark.parametrize("case", sorted(BCE_EMPTY))
@pytest.mark.parametrize("reduction", TORCH_REDUCTIONS + ["sample_mean"])
@pytest.mark.parametrize(
    "extra", [{}, {"class_weighting": "inverse"}, {"class_weighting": "balanced"}, {"sample_weight": True}],
    ids=["plain", "inverse", "balanced", "sample_weight"],
)
def test_bce_empty_batch(bce_impl, case, reduction, extra):
    input_shape, kwargs = BCE_EMPTY[case]
    x, t = _logits(*input_shape), torch.zeros(input_shape, dtype=torch.float64)
    torch_fn = F.binary_cross_entropy_with_logits
    expected, _ = _value_and_grad(torch_fn, x, t, reduction=_torch_reduction(reduction), **kwargs)
    if extra.get("sample_weight"):
        rows = input_shape[:-1] if len(input_shape) >= 2 else input_shape
        extra = {"sample_weight": torch.ones(rows, dtype=torch.float64)}
    out, grad = _value_and_grad(bce_impl, x, t, reduction=reduction, **kwargs, **extra)
    _assert_torch_like(out, expected)
    assert grad.shape == x.shape


ALL_IGNORED = {
    "default": ((4, 5), torch.full((4,), -100), -100),
    "out-of-range-ignore": ((4, 5), torch.full((4,), 7), 7),
    "spatial": ((2, 5, 3), torch.full((2, 3), -1, dtype=torch.int32), -1),
    "unbatched": ((5,), torch.tensor(-100), -100),
}
TORCH_EXTRAS = {
    "plain": {},
    "weighted": {"weight": _weights(5)},
    "smoothed": {"label_smoothing": 0.2, "weight": _weights(5)},
}


@pytest.mark.parametrize("case", sorted(ALL_IGNORED))
@pytest.mark.parametrize("reduction", TORCH_REDUCTIONS)
@pytest.mark.parametrize("extra", sorted(TORCH_EXTRAS))
def test_cross_entropy_all_ignored_matches_torch(ce_impl, case, reduction, extra):
    input_shape, t, ignore_index = ALL_IGNORED[case]
    kwargs = dict(TORCH_EXTRAS[extra], ignore_index=ignore_index, reduction=reduction)
    x = _logits(*input_shape)
    out, grad = _value_and_grad(ce_impl, x, t, **kwargs)
    expected, expected_grad = _value_and_grad(F.cross_entropy, x, t.long(), **kwargs)
    _assert_torch_like(out, expected)
    if reduction != "mean":  # see test_cross_entropy_all_ignored_mean_gradient
        _assert_torch_like(grad, expected_grad)
        assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("case", sorted(ALL_IGNORED))
@pytest.mark.parametrize(
    "reduction, expected", [("mean", math.nan), ("sample_mean", math.nan), ("sum", 0.0), ("none", 0.0)]
)
@pytest.mark.parametrize("class_weighting", SCHEMES, ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cross_entropy_all_ignored_dynamic_weights(
    ce_impl, case, reduction, expected, class_weighting, label_smoothing, dtype
):
    input_shape, t, ignore_index = ALL_IGNORED[case]
    x = _logits(*input_shape, dtype=dtype)
    kwargs = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    out, grad = _value_and_grad(ce_impl, x, t, class_weighting=class_weighting, **kwargs)
    loss_shape = input_shape[:1] + input_shape[2:] if len(input_shape) > 1 else ()
    assert out.shape == (loss_shape if reduction == "none" else ())
    assert not torch.isinf(out).any()
    _assert_torch_like(out, torch.full(out.shape, expected, dtype=dtype))
    if reduction in ("sum", "none"):
        assert torch.equal(grad, torch.zeros_like(x))


def test_cross_entropy_all_ignored_mean_gradient(ce_impl):
    x, t = _logits(4, 5), torch.full((4,), -100)
    _, grad = _value_and_grad(ce_impl, x, t)
    _, expected_grad = _value_and_grad(F.cross_entropy, x, t)
    _assert_torch_like(grad, expected_grad)


def test_smoothing_whose_weight_overflows_float32_is_rejected():
    # 1 / 1e-39 is inf in float32: the weight of an absent class would not be finite
    with pytest.raises(ValueError, match=r"BatchWeighting: smoothing must be a finite number >= .*got 1e-39"):
        BatchWeighting("inverse", smoothing=1e-39)


def test_cross_entropy_all_ignored_smallest_smoothing_float32(ce_impl):
    x, t = _logits(4, 5, dtype=torch.float32), torch.full((4,), -100)
    tiny = torch.finfo(torch.float32).tiny
    for reduction, expected in (("sum", 0.0), ("none", torch.zeros(4))):
        out = ce_impl(x, t, reduction=reduction, class_weighting=BatchWeighting("inverse", smoothing=tiny))
        _assert_torch_like(out, torch.as_tensor(expected, dtype=torch.float32))
