"""The public loss functions: drop-ins for ``torch.nn.functional`` with weighting built in.

Each call checks its arguments (shapes, dtypes, devices: no tensor data, so no host sync) and
hands them to the compiled operators when they serve the device (see :func:`fused_wloss.backend`)
and the call (``ops.ce_supported`` / ``ops.bce_supported``), else to :mod:`fused_wloss.reference`,
whose docstring holds the exact formulas.

``return_stats=True`` also returns what the call applied (counts, weights, normaliser) as a
:class:`CrossEntropyStats` / :class:`BCEStats`, for logging. The kernels return the weights and
the normaliser they used; the counts, which they do not return, are summed here from the targets
(a pass over the N integers of a class-index target, not over the logits). With
``return_stats=False`` (the default) none of this runs.

``BatchWeighting(sync=True)`` sums those counts across a process group before the weights are
formed (see :mod:`fused_wloss.distributed`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _autocast, _checks, distributed, reference
from ._backend import use_extension
from ._weighting import BatchWeighting, BCEStats, CrossEntropyStats

__all__ = ["BCEStats", "CrossEntropyStats", "binary_cross_entropy_with_logits", "cross_entropy"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sums_dtype(device: torch.device) -> torch.dtype:
    # Counts are summed in float64 (exact to 2^53); MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _scheme_args(weighting: Optional[BatchWeighting]):
    if weighting is None:
        return 0, 1.0, 0.999
    return weighting.scheme_code, weighting.smoothing, weighting.beta


def _refuse_sample_weight_grad(sample_weight, loss: str) -> None:
    if sample_weight is not None and sample_weight.requires_grad:
        raise ValueError(
            f"{loss}: with BatchWeighting(sync=True), sample_weight must not require grad: its "
            "gradient goes through the group's normaliser and the other ranks' losses, which this "
            "rank does not have; pass sample_weight.detach()"
        )


def _nan_where_zero(norm: torch.Tensor) -> torch.Tensor:
    """0 where ``norm`` is non-zero, NaN where it is 0: added to a mean whose normaliser is 0 it
    gives NaN, as torch's 0 / 0, also on a rank whose own share is an empty sum."""
    return torch.where(norm == 0, torch.full_like(norm, float("nan")), torch.zeros_like(norm))


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
    return_stats: bool = False,
    gamma: float = 0.0,
):
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
        return_stats: also return a :class:`CrossEntropyStats` (class counts, class weights,
            normaliser): the result is then ``(loss, stats)``.
        gamma: focal loss (Lin et al., 2017): each element's ``-log p_t`` becomes
            ``(1 - p_t)^gamma * -log p_t``, every weight and normaliser unchanged. ``0`` (the
            default) is plain cross-entropy. Needs class-index targets and no label smoothing.

    With ``class_weighting=BatchWeighting(..., sync=True)`` under an initialised
    ``torch.distributed`` process group, the counts and the normaliser are the group's and the
    loss is scaled for DistributedDataParallel's averaging (see :mod:`fused_wloss.distributed`).
    """
    args = _checks.check_cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, sample_weight,
        class_weighting, size_average, reduce,
    )
    gamma = _checks.check_focal_ce(gamma, label_smoothing, args.prob_target)
    label_smoothing = float(label_smoothing)
    if args.weighting is not None and distributed.sync_active(args.weighting):
        loss, stats = _cross_entropy_synced(
            input, target, weight, ignore_index, label_smoothing, sample_weight, args, gamma
        )
        return (loss, stats) if return_stats else loss
    if not return_stats:
        return _cross_entropy_route(
            input, target, weight, ignore_index, args.reduction, label_smoothing, sample_weight,
            args.weighting, args.prob_target, gamma,
        )
    return _cross_entropy_with_stats(
        input, target, weight, ignore_index, label_smoothing, sample_weight, args, gamma
    )


def _cross_entropy_route(input, target, weight, ignore_index, reduction, label_smoothing,
                         sample_weight, weighting, prob_target, gamma=0.0):
    """The loss alone, from the kernels where they serve the call, else from the reference."""
    if use_extension(input.device):
        from . import ops

        if ops.ce_supported(input, target, weight, sample_weight, prob_target):
            if prob_target:
                return ops.cross_entropy_prob(
                    input, target, weight, reduction, label_smoothing, sample_weight, weighting,
                    _autocast.ce_prob_loss_dtype(input, target),
                )
            return ops.cross_entropy(
                input, target, weight, ignore_index, reduction, label_smoothing,
                sample_weight, weighting, gamma, _autocast.loss_dtype(input),
            )
    if not prob_target:
        _checks.check_target_range(target, input.shape[0 if input.dim() == 1 else 1], ignore_index)
    return reference.cross_entropy_checked(
        input, target, weight, ignore_index, reduction, label_smoothing,
        sample_weight, weighting, prob_target, gamma,
    )


def _ce_local_sums(input, target, ignore_index, sample_weight, reduction, prob_target):
    """The per-call sums the class weights and the normaliser are formed from, in one vector
    (float64) so that a process group can add them with one collective:

    - class-index target: ``[n_c (C)]``, plus ``[sum of sample_weight over class c (C)]`` for
      ``"mean"`` with a ``sample_weight``; ``n_c`` counts the non-ignored targets of class ``c``
      (a target outside ``[0, C)`` counts nowhere: the kernel or the range check reports it);
    - probability target: ``[sum_i q[i, c] (C), sum of sample_weight (or element count),
      element count]``.

    Reads the targets, never the logits.
    """
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    dtype = _sums_dtype(input.device)
    if prob_target:
        q = target.detach().to(dtype)
        if input.dim() == 1:
            q = q.unsqueeze(0)
        dims = [0] + list(range(2, q.dim()))
        elements = math.prod(q.shape[:1] + q.shape[2:])  # elements of the unreduced loss
        count = torch.full((1,), elements, dtype=dtype, device=input.device)
        sw_total = count if sample_weight is None else sample_weight.detach().to(dtype).sum().reshape(1)
        return torch.cat([q.sum(dim=dims), sw_total, count])
    return _class_sums(target, num_classes, ignore_index, sample_weight, reduction, input.device)


def _class_sums(target, num_classes, ignore_index, sample_weight, reduction, device):
    """The class-index part of ``_ce_local_sums``: ``[n_c (C)]``, plus the per-class sums of
    ``sample_weight`` for ``"mean"`` with one (also the fused linear cross-entropy's)."""
    dtype = _sums_dtype(device)
    t = target.detach().reshape(-1).long()
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    counts = torch.zeros(num_classes, dtype=dtype, device=device)
    parts = [counts]
    if num_classes > 0:  # with no class every target is ignored: nothing to count
        safe_t = torch.where(valid, t, 0)
        counts.scatter_add_(0, safe_t, valid.to(dtype))
        if reduction == "mean" and sample_weight is not None:
            per_class_sw = torch.zeros(num_classes, dtype=dtype, device=device)
            sw = sample_weight.detach().reshape(-1).to(dtype)
            per_class_sw.scatter_add_(0, safe_t, torch.where(valid, sw, 0.0))
            parts.append(per_class_sw)
    return torch.cat(parts) if len(parts) > 1 else counts


def _ce_weights_and_norm(sums, num_classes, weight, weighting, reduction, prob_target,
                         has_sample_weight, acc):
    """From (possibly group-summed) ``_ce_local_sums``: the counts, the class weights applied
    and the normaliser, in ``acc``. The class weights and the normaliser keep the graph of a
    static ``weight`` that requires grad (torch's "mean" differentiates through its normaliser)."""
    counts = sums[:num_classes].to(acc)
    dynamic = weighting.weights(counts) if weighting is not None else None
    if dynamic is None and weight is None:
        class_weight = torch.ones(num_classes, dtype=acc, device=sums.device)
    elif dynamic is None:
        class_weight = weight.to(acc)
    else:
        class_weight = dynamic if weight is None else dynamic * weight.to(acc)
    if reduction in ("none", "sum"):
        norm = torch.ones((), dtype=acc, device=sums.device)
    elif prob_target:
        norm = sums[num_classes if reduction == "mean" else num_classes + 1].to(acc)
    elif reduction == "sample_mean":
        norm = counts.sum()
    else:  # "mean": sum_i s_i v_i W[t_i] = sum_c W_c * (count, or sample weights, of class c)
        per_class = sums[num_classes : 2 * num_classes] if has_sample_weight else sums[:num_classes]
        norm = (class_weight.to(sums.dtype) * per_class).sum().to(acc)
    return counts, class_weight, norm


def _cross_entropy_with_stats(input, target, weight, ignore_index, label_smoothing, sample_weight,
                              args, gamma=0.0):
    acc = _acc_dtype(input.dtype)
    num_classes = args.num_classes
    weighting = args.weighting
    sums = _ce_local_sums(input, target, ignore_index, sample_weight, args.reduction, args.prob_target)
    if use_extension(input.device):
        from . import ops

        if ops.ce_supported(input, target, weight, sample_weight, args.prob_target):
            # The operator returns the class weights it applied and its normaliser: log those.
            # (ops._ops: the namespace the wrappers use, which the tests may point elsewhere.)
            if args.prob_target:
                loss, _stats, class_weight, norm = ops._ops.cross_entropy_prob_forward(
                    input, target, weight, sample_weight, label_smoothing,
                    ops.REDUCTION_CODES[args.reduction], *_scheme_args(weighting),
                    _autocast.ce_prob_loss_dtype(input, target),
                )
            else:
                loss, _lse, class_weight, norm = ops._ops.cross_entropy_forward(
                    input, target, weight, sample_weight, ignore_index, label_smoothing,
                    ops.REDUCTION_CODES[args.reduction], *_scheme_args(weighting), gamma,
                    _autocast.loss_dtype(input),
                )
            if weight is None and weighting is None:  # the operator returns an empty tensor
                class_weight = torch.ones(num_classes, dtype=acc, device=input.device)
            return loss, CrossEntropyStats(sums[:num_classes].to(acc), class_weight.detach(), norm.detach())
    loss = _cross_entropy_route(
        input, target, weight, ignore_index, args.reduction, label_smoothing, sample_weight,
        weighting, args.prob_target, gamma,
    )
    counts, class_weight, norm = _ce_weights_and_norm(
        sums, num_classes, weight, weighting, args.reduction, args.prob_target,
        sample_weight is not None, acc,
    )
    return loss, CrossEntropyStats(counts, class_weight.detach(), norm.detach())


def _cross_entropy_synced(input, target, weight, ignore_index, label_smoothing, sample_weight, args,
                          gamma=0.0):
    """Counts over the process group, then one pass of the kernel with the resulting weights as
    static class weights; the normaliser and DDP's 1/R are folded into those weights, so the
    kernel's ``"sum"`` is this rank's share of the global mean (no float16 overflow of a plain
    sum)."""
    acc = _acc_dtype(input.dtype)
    num_classes = args.num_classes
    weighting = args.weighting
    reduction = args.reduction
    _refuse_sample_weight_grad(sample_weight, "cross_entropy")
    local = _ce_local_sums(input, target, ignore_index, sample_weight, reduction, args.prob_target)
    sums, world = distributed.all_reduce_sum(local, weighting.process_group)
    counts, class_weight, norm = _ce_weights_and_norm(
        sums, num_classes, weight, weighting, reduction, args.prob_target,
        sample_weight is not None, acc,
    )
    applied = class_weight  # keeps the graph of a static weight that requires grad
    if reduction in ("mean", "sample_mean"):
        applied = applied * (world / norm)
    elif reduction == "sum":
        applied = applied * world
    loss = _cross_entropy_route(
        input, target, applied, ignore_index, "none" if reduction == "none" else "sum",
        label_smoothing, sample_weight, None, args.prob_target, gamma,
    )
    if reduction in ("mean", "sample_mean"):
        loss = loss + _nan_where_zero(norm.detach()).to(loss.dtype)
    return loss, CrossEntropyStats(counts, class_weight.detach(), norm.detach())


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
    return_stats: bool = False,
    gamma: float = 0.0,
    alpha: Optional[float] = None,
):
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
        return_stats: also return a :class:`BCEStats` (per-label counts and dynamic weights,
            normaliser): the result is then ``(loss, stats)``.
        gamma, alpha: sigmoid focal loss as ``torchvision.ops.sigmoid_focal_loss`` defines it:
            each element's loss times ``alpha_t * (1 - p_t)^gamma`` with ``p = sigmoid(x)``,
            ``p_t = p t + (1 - p)(1 - t)`` and ``alpha_t = alpha t + (1 - alpha)(1 - t)``
            (``alpha=None``: 1), before ``weight``, ``pos_weight``, the dynamic weights and
            ``sample_weight`` apply as usual. ``gamma=0, alpha=None`` is plain BCE.

    A single-logit classifier with class weights ``[w0, w1]`` (negatives ``w0``, positives ``w1``)
    is ``binary_cross_entropy_with_logits(x, t, weight=torch.tensor(w0),
    pos_weight=torch.tensor(w1 / w0))``.

    ``BatchWeighting(..., sync=True)`` sums the label counts and the element count over a process
    group, as for :func:`cross_entropy`.
    """
    args = _checks.check_bce(
        input, target, weight, reduction, pos_weight, sample_weight, class_weighting,
        size_average, reduce,
    )
    focal = _checks.check_focal_bce(gamma, alpha)
    if args.weighting is not None and distributed.sync_active(args.weighting):
        loss, stats = _bce_synced(input, target, weight, pos_weight, sample_weight, args, focal)
        return (loss, stats) if return_stats else loss
    if not return_stats:
        return _bce_route(input, target, weight, args.reduction, pos_weight, sample_weight, args.weighting, focal)
    return _bce_with_stats(input, target, weight, pos_weight, sample_weight, args, focal)


def _bce_route(input, target, weight, reduction, pos_weight, sample_weight, weighting, focal=(0.0, None)):
    """The loss alone, from the kernels where they serve the call, else from the reference."""
    if use_extension(input.device):
        from . import ops

        if ops.bce_supported(input, target, weight, pos_weight, sample_weight):
            return ops.binary_cross_entropy_with_logits(
                input, target, weight, reduction, pos_weight, sample_weight, weighting, *focal,
                _autocast.bce_loss_dtype(input, target),
            )
    return reference.bce_checked(input, target, weight, reduction, pos_weight, sample_weight, weighting, *focal)


def _bce_local_sums(input, target):
    """``[sum of t per label (L), rows, elements]`` in float64: what the label weights and the
    normaliser are formed from (the negatives' count is ``rows - sum t``, as in the kernel)."""
    dtype = _sums_dtype(input.device)
    t = target.detach()
    if input.dim() >= 2:
        positives = t.sum(dim=tuple(range(input.dim() - 1)), dtype=dtype)
        rows = math.prod(input.shape[:-1])
    else:  # 0-d or 1-D: a batch of single-logit predictions, one label
        positives = t.sum(dtype=dtype).reshape(1)
        rows = input.numel()
    # new_full, not torch.tensor([...], device=...): a copy from a host list into CUDA memory
    # synchronises the stream
    return torch.cat([positives, positives.new_full((1,), rows), positives.new_full((1,), input.numel())])


def _bce_weights_and_norm(sums, weighting, reduction, acc):
    num_labels = sums.shape[0] - 2
    pos_counts = sums[:num_labels]
    neg_counts = (sums[num_labels] - pos_counts).to(acc)
    pos_counts = pos_counts.to(acc)
    if weighting is None:
        neg_w = pos_w = torch.ones(num_labels, dtype=acc, device=sums.device)
    elif weighting.balanced:
        neg_w, pos_w = weighting.weights(neg_counts), weighting.weights(pos_counts)
    else:
        neg_w = pos_w = weighting.weights(pos_counts)
    if reduction in ("mean", "sample_mean"):
        norm = sums[num_labels + 1].to(acc)
    else:
        norm = torch.ones((), dtype=acc, device=sums.device)
    return BCEStats(pos_counts, neg_counts, neg_w, pos_w, norm)


def _bce_with_stats(input, target, weight, pos_weight, sample_weight, args, focal=(0.0, None)):
    acc = _acc_dtype(input.dtype)
    stats = _bce_weights_and_norm(_bce_local_sums(input, target), args.weighting, args.reduction, acc)
    if use_extension(input.device):
        from . import ops

        if ops.bce_supported(input, target, weight, pos_weight, sample_weight):
            # The operator returns the label weights it applied: log those.
            loss, neg_w, pos_w = ops._ops.bce_forward(
                input, target, weight, pos_weight, sample_weight, ops.REDUCTION_CODES[args.reduction],
                *_scheme_args(args.weighting)[:3], args.weighting is not None and args.weighting.balanced,
                focal[0], -1.0 if focal[1] is None else focal[1], _autocast.bce_loss_dtype(input, target),
            )
            if args.weighting is not None:  # without weighting the operator returns empty tensors
                stats = stats._replace(neg_weight=neg_w, pos_weight=pos_w)
            return loss, stats
    loss = _bce_route(input, target, weight, args.reduction, pos_weight, sample_weight, args.weighting, focal)
    return loss, stats


def _bce_synced(input, target, weight, pos_weight, sample_weight, args, focal=(0.0, None)):
    """Label counts over the process group, then one pass of the kernel with the label weights
    (and the normaliser and DDP's 1/R) folded into its static per-label ``weight`` and
    ``pos_weight``: the negative part of label ``l`` is weighted ``a_l``, the positive part
    ``a_l * (b_l / a_l) * pos_weight_l = b_l * pos_weight_l`` (every scheme's weights are > 0)."""
    acc = _acc_dtype(input.dtype)
    weighting = args.weighting
    reduction = args.reduction
    _refuse_sample_weight_grad(sample_weight, "binary_cross_entropy_with_logits")
    sums, world = distributed.all_reduce_sum(_bce_local_sums(input, target), weighting.process_group)
    stats = _bce_weights_and_norm(sums, weighting, reduction, acc)
    applied = stats.neg_weight
    if reduction in ("mean", "sample_mean"):
        applied = applied * (world / stats.normalizer)
    elif reduction == "sum":
        applied = applied * world
    if input.dim() == 0:  # a (1,) weight would give the 0-d loss a dimension
        applied = applied.reshape(())
    elem_weight = applied if weight is None else weight * applied
    elem_pos_weight = pos_weight
    if weighting.balanced:
        ratio = stats.pos_weight / stats.neg_weight
        if input.dim() == 0:
            ratio = ratio.reshape(())
        elem_pos_weight = ratio if pos_weight is None else pos_weight * ratio
    loss = _bce_route(
        input, target, elem_weight, "none" if reduction == "none" else "sum", elem_pos_weight,
        sample_weight, None, focal,
    )
    if reduction in ("mean", "sample_mean"):
        loss = loss + _nan_where_zero(stats.normalizer).to(loss.dtype)
    return loss, stats
