"""The public loss functions: drop-ins for ``torch.nn.functional`` with weighting built in.

Each call checks its arguments (shapes, dtypes, devices: no tensor data, so no host sync) and
hands them to the compiled operators when they serve the device (see :func:`fused_wloss.backend`)
and the call (``ops.ce_supported`` / ``ops.bce_supported``), else to :mod:`fused_wloss.reference`,
whose docstring holds the exact formulas.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, reference
from ._backend import use_extension

__all__ = ["cross_entropy", "binary_cross_entropy_with_logits"]


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    sample_weight: Optional[torch.Tensor] = None,
    class_weighting=None,
) -> torch.Tensor:
    r"""Softmax cross-entropy: :func:`torch.nn.functional.cross_entropy` plus weighting.

    Takes everything torch's function takes, with the same results and gradients, and:

    Args:
        sample_weight: a weight per element of the unreduced loss, shape ``(N,)`` or
            ``(N, d1, ..., dk)`` (``()`` for an unbatched input). It multiplies that element's loss
            and, under ``"mean"``, joins the normaliser.
        class_weighting: class weights computed from this call's own targets: ``"inverse"``
            (``1 / (n_c + 1)``, ``n_c`` the count of non-ignored targets of class ``c``),
            ``"inverse_sqrt"``, ``"effective_number"`` or a :class:`fused_wloss.BatchWeighting`.
            They multiply the static ``weight``.
        reduction: ``"none"``, ``"sum"``, ``"mean"`` (torch's weighted mean: divided by the sum of
            the applied weights) or ``"sample_mean"`` (divided by the number of non-ignored
            elements: the mean of the ``"none"`` output over them).
    """
    args = _checks.check_cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, sample_weight,
        class_weighting, size_average, reduce,
    )
    if use_extension(input.device):
        from . import ops

        if ops.ce_supported(input, target, weight, sample_weight, args.prob_target):
            return ops.cross_entropy(
                input, target, weight, ignore_index, args.reduction, float(label_smoothing),
                sample_weight, args.weighting,
            )
    if not args.prob_target:
        _checks.check_target_range(target, args.num_classes, ignore_index)
    return reference.cross_entropy_checked(
        input, target, weight, ignore_index, args.reduction, float(label_smoothing),
        sample_weight, args.weighting, args.prob_target,
    )


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[torch.Tensor] = None,
    *,
    sample_weight: Optional[torch.Tensor] = None,
    class_weighting=None,
) -> torch.Tensor:
    r"""Sigmoid binary cross-entropy: :func:`torch.nn.functional.binary_cross_entropy_with_logits`
    plus weighting.

    The last dimension holds the labels (a 0-d or 1-D input is a batch of single-logit binary
    predictions); every other dimension holds samples.

    Args:
        sample_weight: one weight per sample, the input's shape without its last dimension
            (``(N,)`` for a 1-D input). It multiplies the loss of every label of the sample.
        class_weighting: label weights from this call's targets: ``"inverse"`` weights label ``l``
            by ``1 / (n_l + 1)``, ``n_l`` the sum of its targets over the samples; ``"balanced"``
            weights its positive part by ``1 / (n_pos + 1)`` and its negative part by
            ``1 / (n_neg + 1)``; or a :class:`fused_wloss.BatchWeighting`.
        reduction: ``"none"``, ``"sum"``, ``"mean"`` (over all elements, as torch) or
            ``"sample_mean"`` (the same as ``"mean"`` here).

    A single-logit classifier with class weights ``[w0, w1]`` (negatives ``w0``, positives ``w1``)
    is ``binary_cross_entropy_with_logits(x, t, weight=torch.tensor(w0),
    pos_weight=torch.tensor(w1 / w0))``.
    """
    args = _checks.check_bce(
        input, target, weight, reduction, pos_weight, sample_weight, class_weighting,
        size_average, reduce,
    )
    if use_extension(input.device):
        from . import ops

        if ops.bce_supported(input, target, weight, pos_weight, sample_weight):
            return ops.binary_cross_entropy_with_logits(
                input, target, weight, args.reduction, pos_weight, sample_weight, args.weighting,
            )
    return reference.bce_checked(
        input, target, weight, args.reduction, pos_weight, sample_weight, args.weighting
    )
