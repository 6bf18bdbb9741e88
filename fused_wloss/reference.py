"""The pure-PyTorch reference: the exact semantics of fused_wloss, written for clarity.

This module is the correctness oracle of every kernel test and the fallback wherever no compiled
kernel serves a call. It has the same signatures as the public functions, is vectorised (no Python
loop over samples or classes), and does no host synchronisation: counts go into a fixed-size vector
with ``scatter_add_``, never through ``torch.bincount`` or boolean-mask indexing.

Half-precision inputs are computed in float32 and the result cast back, as the kernels do; under
``torch.autocast`` (for the input's device type) the result stays float32, as torch's own losses
return it there.

Cross-entropy, index targets (``t_i`` the class of element ``i``, ``W_c`` the class weight, the
product of the static ``weight[c]`` and the dynamic weight of class ``c``, ``s_i`` the sample weight,
``v_i`` = 0 if ``t_i == ignore_index`` else 1, ``eps`` the label smoothing)::

    loss_i = s_i * v_i * ((1 - eps) * W[t_i] * -logp[i, t_i] + eps / C * sum_c W_c * -logp[i, c])
    "mean":        sum_i loss_i / sum_i s_i * v_i * W[t_i]
    "sample_mean": sum_i loss_i / sum_i v_i

Cross-entropy, probability targets (``q`` the target smoothed as ``(1 - eps) * q + eps / C``)::

    loss_i = s_i * sum_c W_c * q[i, c] * -logp[i, c]
    "mean":        sum_i loss_i / sum_i s_i        (the element count when s is absent)
    "sample_mean": sum_i loss_i / element count

Binary cross-entropy with logits, per element (``a``, ``b`` the weights of the negative and the
positive part: both the dynamic label weight, or for "balanced" the negative and positive weight;
``b`` also carries ``pos_weight``)::

    loss = weight * s_row * (a * (1 - t) * softplus(x) + b * t * softplus(-x))
    "mean" = "sample_mean" = sum / element count

Focal loss (``gamma`` > 0; Lin et al., 2017). Cross-entropy with index targets, no label
smoothing: ``-logp[i, t_i]`` becomes ``(1 - p_t)^gamma * -logp[i, t_i]`` with ``p_t = exp(logp[i, t_i])``,
the weights and normalisers unchanged. Binary cross-entropy, as ``torchvision.ops.sigmoid_focal_loss``
(``p = sigmoid(x)``, ``1 - p_t = p (1 - t) + (1 - p) t``, ``alpha_t = alpha t + (1 - alpha)(1 - t)``, or 1
without ``alpha``): the element loss above, before ``weight`` and ``s_row``, times ``alpha_t (1 - p_t)^gamma``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _autocast, _checks
from ._weighting import BatchWeighting

__all__ = ["cross_entropy", "binary_cross_entropy_with_logits"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32 and float64 as they are."""
    return torch.promote_types(dtype, torch.float32)


def _reduce(loss: torch.Tensor, reduction: str, mean_denominator, sample_mean_denominator):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    denominator = mean_denominator if reduction == "mean" else sample_mean_denominator
    if not isinstance(denominator, torch.Tensor):
        return total / denominator  # an element count: 0 only for an empty batch
    # A zero normaliser gives NaN, as torch: the value, and the gradient of every element that
    # takes part (ignored elements are cut out of the graph by the caller, so they keep a zero
    # gradient, as in torch). Multiplying by NaN rather than dividing by 0 keeps a loss whose
    # numerator is positive (label smoothing) from coming out as +inf.
    denominator = denominator.to(total.dtype)  # an int64 count would make 1 / count float32
    empty = denominator == 0
    safe = torch.where(empty, torch.ones_like(denominator), denominator)
    return total * torch.where(empty, torch.full_like(total, float("nan")), 1.0 / safe)


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
    gamma: float = 0.0,
) -> torch.Tensor:
    """Reference of :func:`fused_wloss.cross_entropy` (see the module docstring for the formulas)."""
    args = _checks.check_cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, sample_weight,
        class_weighting, size_average, reduce,
    )
    gamma = _checks.check_focal_ce(gamma, label_smoothing, args.prob_target)
    if not args.prob_target:
        _checks.check_target_range(target, args.num_classes, ignore_index)
    return cross_entropy_checked(
        input, target, weight, ignore_index, args.reduction, float(label_smoothing),
        sample_weight, args.weighting, args.prob_target, gamma,
    )


def _focal_factor(u: torch.Tensor, gamma: float) -> torch.Tensor:
    """``u ** gamma`` with a finite gradient where ``u`` is 0 (``u ** (gamma - 1)`` is infinite
    there for gamma < 1, and the true derivative of the focal loss is 0)."""
    positive = u > 0
    safe = torch.where(positive, u, torch.ones_like(u))
    return torch.where(positive, safe**gamma, torch.zeros_like(u))


def cross_entropy_checked(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    sample_weight: Optional[torch.Tensor],
    weighting: Optional[BatchWeighting],
    prob_target: bool,
    gamma: float = 0.0,
) -> torch.Tensor:
    """The reference computation on arguments that have passed the checks."""
    dtype = _compute_dtype(input.dtype)
    x = input.to(dtype)
    unbatched = x.dim() == 1
    if unbatched:  # (C,) -> (1, C): one sample
        x, target = x.unsqueeze(0), target.unsqueeze(0)
        if sample_weight is not None:
            sample_weight = sample_weight.unsqueeze(0)
    num_classes = x.shape[1]
    spatial_dims = [0] + list(range(2, x.dim()))  # every dimension but the class dimension
    per_class = (1, num_classes) + (1,) * (x.dim() - 2)  # view that broadcasts (C,) along dim 1

    logp = torch.log_softmax(x, dim=1)
    class_w = weight.to(dtype) if weight is not None else None
    eps = label_smoothing

    if prob_target:
        q = target.to(dtype)
        if weighting is not None:
            counts = q.detach().sum(dim=spatial_dims)  # soft counts: summed probabilities
            dynamic = weighting.weights(counts)
            class_w = dynamic if class_w is None else class_w * dynamic
        if eps > 0.0:
            q = q * (1.0 - eps) + (eps / num_classes if num_classes > 0 else 0.0)  # no class: an empty sum
        weighted_logp = logp if class_w is None else logp * class_w.view(per_class)
        loss = -(weighted_logp * q).sum(dim=1)
        count = loss.numel()
        if sample_weight is not None:
            sw = sample_weight.to(dtype)
            loss = loss * sw
            mean_denominator = sw.sum()
        else:
            mean_denominator = count
        sample_mean_denominator = count
    else:
        t = target.long()
        valid = t != ignore_index
        safe_t = torch.where(valid, t, 0)  # ignored elements point at class 0, then are masked
        if weighting is not None:
            counts = torch.zeros(num_classes, dtype=torch.long, device=t.device)
            if num_classes > 0:  # with no class every target is ignored: nothing to count
                counts.scatter_add_(0, safe_t.flatten(), valid.flatten().long())
            dynamic = weighting.weights(counts.to(dtype))
            class_w = dynamic if class_w is None else class_w * dynamic
        if num_classes > 0:
            nll = -logp.gather(1, safe_t.unsqueeze(1)).squeeze(1)
            if gamma > 0.0:  # focal: (1 - p_t)^gamma * nll, 1 - p_t = -expm1(-nll)
                nll = _focal_factor(-torch.expm1(-nll), gamma) * nll
        else:  # no class: every target is ignored (the range check saw to it)
            nll = x.sum(dim=1) * 0.0  # zeros that keep the graph: the input's gradient is 0, not missing
        target_w = valid.to(dtype)
        if class_w is not None and num_classes > 0:
            target_w = torch.where(valid, class_w[safe_t], 0.0)
        if sample_weight is not None:
            target_w = target_w * sample_weight.to(dtype)
        loss = target_w * nll
        if eps > 0.0:
            weighted_logp = logp if class_w is None else logp * class_w.view(per_class)
            smooth = -weighted_logp.sum(dim=1)
            row_w = valid.to(dtype)
            if sample_weight is not None:
                row_w = row_w * sample_weight.to(dtype)
            smooth_scale = eps / num_classes if num_classes > 0 else 0.0  # no class: every target ignored
            loss = (1.0 - eps) * loss + smooth_scale * row_w * smooth
        # ignored elements leave the graph entirely: their gradient is 0 whatever the normaliser
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        mean_denominator = target_w.sum()
        sample_mean_denominator = valid.sum()

    if unbatched:
        loss = loss.squeeze(0)
    out = _reduce(loss, reduction, mean_denominator, sample_mean_denominator)
    if prob_target:  # as torch: the logits' dtype promoted with the probabilities'
        return out.to(_autocast.ce_prob_result_dtype(input, target))
    return out.to(_autocast.result_dtype(input))


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
    gamma: float = 0.0,
    alpha: Optional[float] = None,
) -> torch.Tensor:
    """Reference of :func:`fused_wloss.binary_cross_entropy_with_logits`."""
    args = _checks.check_bce(
        input, target, weight, reduction, pos_weight, sample_weight, class_weighting,
        size_average, reduce,
    )
    gamma, alpha = _checks.check_focal_bce(gamma, alpha)
    return bce_checked(input, target, weight, args.reduction, pos_weight, sample_weight, args.weighting,
                       gamma, alpha)


def bce_checked(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    reduction: str,
    pos_weight: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor],
    weighting: Optional[BatchWeighting],
    gamma: float = 0.0,
    alpha: Optional[float] = None,
) -> torch.Tensor:
    """The reference computation on arguments that have passed the checks."""
    dtype = _compute_dtype(input.dtype)
    x = input.to(dtype)
    t = target.to(dtype)
    neg_w = pos_w = None  # a and b of the module docstring; None means 1
    if weighting is not None:
        # counts per label: sums over every dimension but the last (one label for 0-d and 1-D)
        td = t.detach()
        rows = tuple(range(x.dim() - 1)) if x.dim() >= 2 else tuple(range(x.dim()))
        label_sum = lambda v: v.sum(dim=rows) if x.dim() >= 2 else v.sum().reshape(1)  # noqa: E731
        if weighting.balanced:
            pos_w = weighting.weights(label_sum(td))
            neg_w = weighting.weights(label_sum(1.0 - td))
        else:
            pos_w = neg_w = weighting.weights(label_sum(td))
        if x.dim() == 0:  # a (1,) weight would turn the 0-d loss into shape (1,)
            pos_w, neg_w = pos_w.reshape(()), neg_w.reshape(())
    if pos_weight is not None:
        pw = pos_weight.to(dtype)
        pos_w = pw if pos_w is None else pos_w * pw

    # a (1 - t) softplus(x) + b t softplus(-x), each part formed on its own: the shorter
    # (1 - t) x + (...) softplus(-x) cancels two products of size a |x| for a negative x, which a
    # large weight a turns into a large error (csrc/fused_wloss_math.h, bce_loss)
    softplus_pos = -torch.nn.functional.logsigmoid(-x)  # softplus(x) = -log(1 - sigmoid(x)), stable
    softplus_neg = -torch.nn.functional.logsigmoid(x)
    neg_part = (1.0 - t) * softplus_pos
    pos_part = t * softplus_neg
    if neg_w is not None:
        neg_part = neg_w * neg_part
    if pos_w is not None:
        pos_part = pos_w * pos_part
    loss = neg_part + pos_part
    # at x = -inf alone the shorter form, whose -inf + inf gives NaN and +inf where torch's does
    n = (1.0 - t) if neg_w is None else neg_w * (1.0 - t)
    p = t if pos_w is None else pos_w * t
    loss = torch.where(x == -math.inf, n * x + (n + p) * softplus_neg, loss)
    if gamma > 0.0:  # sigmoid focal: (1 - p_t)^gamma, 1 - p_t = p (1 - t) + (1 - p) t
        # 1 - p as sigmoid(-x): exact where p rounds to 1 (x > 17 in float32)
        loss = loss * _focal_factor(torch.sigmoid(x) * (1.0 - t) + torch.sigmoid(-x) * t, gamma)
    if alpha is not None:
        loss = loss * (alpha * t + (1.0 - alpha) * (1.0 - t))
    if weight is not None:
        loss = loss * weight.to(dtype)
    if sample_weight is not None:
        sw = sample_weight.to(dtype)
        loss = loss * (sw.unsqueeze(-1) if x.dim() >= 2 else sw)
    count = loss.numel()
    return _reduce(loss, reduction, count, count).to(_autocast.bce_result_dtype(input, target))
