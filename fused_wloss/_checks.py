"""Argument checks shared by the public functions and the reference.

Everything here looks only at shapes, dtypes, devices and Python scalars, never at tensor data,
so it costs no host synchronisation and traces cleanly under ``torch.compile``. The one check that
needs the data, the range of class-index targets, is :func:`check_target_range`; it can be
switched off with :func:`set_target_validation` or ``FUSED_WLOSS_VALIDATE_TARGETS=0``.

Messages name the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
from torch.nn import _reduction as torch_reduction

from ._weighting import BatchWeighting, resolve_class_weighting

__all__ = ["set_target_validation", "target_validation_enabled"]

REDUCTIONS = ("none", "mean", "sum", "sample_mean")
_INDEX_DTYPES = (torch.int64, torch.int32)

_validate_targets = os.environ.get("FUSED_WLOSS_VALIDATE_TARGETS", "1") != "0"


def set_target_validation(enabled: bool) -> None:
    """Turn the data-dependent check of class-index targets on (the default) or off.

    On the reference path the check is a separate pass over the targets (free of host
    synchronisation on CUDA, where it becomes a device-side assert); it is skipped while
    ``torch.compile`` traces. The compiled kernels check every target in their own pass whatever
    this setting says. Turning it off saves that pass; an out-of-range target then fails inside
    torch's indexing instead of with our message.
    """
    global _validate_targets
    _validate_targets = bool(enabled)


def target_validation_enabled() -> bool:
    return _validate_targets


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def reduction_mode(size_average, reduce, reduction: str, *, loss: str) -> str:
    """torch's legacy ``size_average``/``reduce`` pair, then a check of ``reduction``."""
    if size_average is not None or reduce is not None:
        reduction = torch_reduction.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{loss}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_logits(input, loss: str) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{loss}: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(
            f"{loss}: input (logits) must be a floating-point tensor "
            f"(float16, bfloat16, float32 or float64), got {input.dtype}"
        )


def _check_float_tensor(value, name: str, loss: str, device: torch.device) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{loss}: {name} must be a torch.Tensor or None, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{loss}: {name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{loss}: {name} must be on the input's device {device}, got {value.device}")


class CrossEntropyArgs(NamedTuple):
    """What the checks established about a cross_entropy call."""

    num_classes: int
    prob_target: bool  # target holds class probabilities (same shape as input)
    reduction: str
    weighting: Optional[BatchWeighting]


def check_cross_entropy(
    input,
    target,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    sample_weight,
    class_weighting,
    size_average=None,
    reduce=None,
) -> CrossEntropyArgs:
    loss = "cross_entropy"
    reduction = reduction_mode(size_average, reduce, reduction, loss=loss)
    weighting = resolve_class_weighting(class_weighting, loss=loss)
    _check_logits(input, loss)
    if input.dim() < 1:
        raise ValueError(
            f"{loss}: input must have shape (C,), (N, C) or (N, C, d1, ..., dk), got a 0-d tensor"
        )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{loss}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(
            f"{loss}: target must be on the input's device {input.device}, got {target.device}"
        )
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    loss_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]

    if target.dtype.is_floating_point:
        prob_target = True
        if target.shape != input.shape:
            raise ValueError(
                f"{loss}: a floating-point target holds class probabilities and must have the "
                f"input's shape {_shape(input)}, got {_shape(target)}"
            )
    elif target.dtype in _INDEX_DTYPES:
        prob_target = False
        if target.shape != loss_shape:
            raise ValueError(
                f"{loss}: a class-index target must have shape {tuple(loss_shape)} for input of "
                f"shape {_shape(input)} (the input's shape without the class dimension), "
                f"got {_shape(target)}"
            )
    else:
        raise TypeError(
            f"{loss}: target must hold class indices (int64 or int32) or class probabilities "
            f"(a floating-point tensor of the input's shape), got {target.dtype}"
        )

    if weight is not None:
        _check_float_tensor(weight, "weight", loss, input.device)
        if weight.shape != (num_classes,):
            raise ValueError(
                f"{loss}: weight must have shape ({num_classes},), one weight per class, "
                f"got {_shape(weight)}"
            )
    if sample_weight is not None:
        _check_float_tensor(sample_weight, "sample_weight", loss, input.device)
        if sample_weight.shape != loss_shape:
            raise ValueError(
                f"{loss}: sample_weight must have the shape of the unreduced loss "
                f"{tuple(loss_shape)}, got {_shape(sample_weight)}"
            )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{loss}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not (-(2**63) <= ignore_index < 2**63):
        raise ValueError(f"{loss}: ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(label_smoothing, (int, float)) or not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{loss}: label_smoothing must be in [0.0, 1.0], got {label_smoothing!r}")
    return CrossEntropyArgs(num_classes, prob_target, reduction, weighting)


def _functorch_wrapped(t: torch.Tensor) -> bool:
    # a BatchedTensor, or one under another wrapper (vmap(grad(...)) wraps it for grad too)
    return torch._C._are_functorch_transforms_active() and torch._C._functorch.is_functorch_wrapped_tensor(t)


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int, loss: str = "cross_entropy") -> None:
    """Raise IndexError if a class-index target is outside [0, C) and is not ignore_index.

    No host synchronisation on CUDA (a device-side assert instead); skipped while compiling, for a
    target wrapped by a torch.func transform (the check is a data-dependent branch, which vmap
    cannot batch; an index out of range then fails in the gather or scatter instead) and when
    switched off with :func:`set_target_validation`.
    """
    if not _validate_targets or torch.compiler.is_compiling() or target.numel() == 0 or _functorch_wrapped(target):
        return
    t = target.long()
    bad = ((t < 0) | (t >= num_classes)) & (t != ignore_index)
    if target.device.type == "cpu":
        if bool(bad.any()):
            position = int(bad.flatten().nonzero()[0])
            raise IndexError(
                f"{loss}: target must hold class indices in [0, {num_classes}) or "
                f"ignore_index={ignore_index}, found {int(t.flatten()[position])} at element {position}"
            )
    else:
        torch._assert_async(
            torch.logical_not(bad.any()),
            f"{loss}: target must hold class indices in [0, {num_classes}) or ignore_index",
        )


def bce_row_shape(input: torch.Tensor) -> torch.Size:
    """The shape of a BCE input without its label (last) dimension; 0-d and 1-D inputs are rows
    of a single label."""
    return input.shape[:-1] if input.dim() >= 2 else input.shape


class BCEArgs(NamedTuple):
    reduction: str
    weighting: Optional[BatchWeighting]


def _check_broadcast(value, name: str, loss: str, input: torch.Tensor, hint: str) -> None:
    _check_float_tensor(value, name, loss, input.device)
    try:
        ok = torch.broadcast_shapes(value.shape, input.shape) == input.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{loss}: {name} must be broadcastable to the input's shape {_shape(input)} "
            f"({hint}), got {_shape(value)}"
        )


def check_bce(
    input,
    target,
    weight,
    reduction,
    pos_weight,
    sample_weight,
    class_weighting,
    size_average=None,
    reduce=None,
) -> BCEArgs:
    loss = "binary_cross_entropy_with_logits"
    reduction = reduction_mode(size_average, reduce, reduction, loss=loss)
    weighting = resolve_class_weighting(class_weighting, loss=loss)
    _check_logits(input, loss)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{loss}: target must be a torch.Tensor, got {type(target).__name__}")
    if not target.dtype.is_floating_point:
        raise TypeError(
            f"{loss}: target must be a floating-point tensor of 0/1 labels or probabilities, "
            f"got {target.dtype}"
        )
    if target.shape != input.shape:
        raise ValueError(
            f"{loss}: target must have the input's shape {_shape(input)}, got {_shape(target)}"
        )
    if target.device != input.device:
        raise ValueError(
            f"{loss}: target must be on the input's device {input.device}, got {target.device}"
        )
    if weight is not None:
        _check_broadcast(weight, "weight", loss, input, "one weight per element")
    if pos_weight is not None:
        _check_broadcast(pos_weight, "pos_weight", loss, input, "one weight per label, along the last dimension")
    if sample_weight is not None:
        _check_float_tensor(sample_weight, "sample_weight", loss, input.device)
        rows = bce_row_shape(input)
        if sample_weight.shape != rows:
            raise ValueError(
                f"{loss}: sample_weight must hold one weight per sample, shape {tuple(rows)} "
                f"(the input's shape without its last, label dimension), got {_shape(sample_weight)}"
            )
    return BCEArgs(reduction, weighting)


def _check_gamma(gamma, loss: str) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"{loss}: gamma must be a float, got {type(gamma).__name__}")
    gamma = float(gamma)
    # comparisons rather than math.isfinite, which torch.compile(dynamic=True) cannot trace on a
    # symbolic float (NaN fails both)
    if not (0.0 <= gamma < math.inf):
        raise ValueError(f"{loss}: gamma (the focal-loss focusing parameter) must be a finite number >= 0, got {gamma}")
    return gamma


def check_focal_ce(gamma, label_smoothing, prob_target: bool, loss: str = "cross_entropy") -> float:
    """The focal ``gamma`` of a cross-entropy call, as a float (``loss``: the function named in errors)."""
    gamma = _check_gamma(gamma, loss)
    if gamma > 0.0 and prob_target:
        raise ValueError(f"{loss}: gamma (focal loss) needs class-index targets, got probability targets")
    if gamma > 0.0 and float(label_smoothing) > 0.0:
        raise ValueError(
            f"{loss}: gamma (focal loss) cannot be combined with label_smoothing={float(label_smoothing)}; "
            "use one or the other"
        )
    return gamma


def check_focal_bce(gamma, alpha) -> tuple:
    """The focal ``gamma`` and ``alpha`` of a BCE call: a float and a float or None."""
    loss = "binary_cross_entropy_with_logits"
    gamma = _check_gamma(gamma, loss)
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"{loss}: alpha must be a float in [0, 1] or None, got {type(alpha).__name__}")
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{loss}: alpha (the focal-loss positive-class weight) must be in [0, 1] or None, got {alpha}")
    return gamma, alpha
