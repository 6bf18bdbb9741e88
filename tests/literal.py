"""The fused_wloss extras written out with plain torch.nn.functional calls and torch.bincount.

An independent second statement of the semantics of sample weights, dynamic class weights and
"sample_mean", so the reference's own formulas are checked against something they were not
derived from. Host syncs (bincount, boolean indexing) are fine here: this is test code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fused_wloss import BatchWeighting


def scheme_weights(spec, counts: torch.Tensor) -> torch.Tensor:
    """The weight formulas, element by element in Python floats."""
    if isinstance(spec, str):
        spec = {"balanced": BatchWeighting("inverse", balanced=True)}.get(spec, None) or BatchWeighting(spec)
    out = []
    for n in counts.tolist():
        if spec.scheme == "inverse":
            out.append(1.0 / (n + spec.smoothing))
        elif spec.scheme == "inverse_sqrt":
            out.append(1.0 / math.sqrt(n + spec.smoothing))
        else:
            out.append((1.0 - spec.beta) / (1.0 - spec.beta ** max(n, 1.0)))
    return torch.tensor(out, dtype=torch.float64)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, sample_weight=None, class_weighting=None):
    x = input.double()
    unbatched = x.dim() == 1
    if unbatched:
        x, target = x.unsqueeze(0), target.unsqueeze(0)
        sample_weight = None if sample_weight is None else sample_weight.unsqueeze(0)
    num_classes = x.shape[1]
    prob = target.dtype.is_floating_point
    W = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
    if class_weighting is not None:
        if prob:
            counts = target.double().transpose(0, 1).reshape(num_classes, -1).sum(1)
        else:
            valid_targets = target[target != ignore_index].long()
            counts = torch.bincount(valid_targets, minlength=num_classes).double()
        W = W * scheme_weights(class_weighting, counts)
    tgt = target.double() if prob else target.long()
    none = F.cross_entropy(x, tgt, weight=W, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    sw = torch.ones_like(none) if sample_weight is None else sample_weight.double()
    none = none * sw
    if prob:
        valid = torch.ones_like(none)
        applied = sw
    else:
        valid = (tgt != ignore_index).double()
        applied = W[tgt.clamp(min=0) * (tgt != ignore_index)] * valid * sw
    if reduction == "none":
        out = none.squeeze(0) if unbatched else none
    elif reduction == "sum":
        out = none.sum()
    elif reduction == "mean":
        out = none.sum() / applied.sum()
    else:
        out = none.sum() / valid.sum()
    return out.to(input.dtype)


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None,
                                     sample_weight=None, class_weighting=None):
    x, t = input.double(), target.double()
    num_labels = x.shape[-1] if x.dim() >= 2 else 1
    neg = torch.ones(num_labels, dtype=torch.float64)
    pos = torch.ones(num_labels, dtype=torch.float64)
    if class_weighting is not None:
        rows = t.reshape(-1, num_labels)
        balanced = class_weighting == "balanced" or getattr(class_weighting, "balanced", False)
        if balanced:
            pos = scheme_weights(class_weighting, rows.sum(0))
            neg = scheme_weights(class_weighting, (1 - rows).sum(0))
        else:
            pos = neg = scheme_weights(class_weighting, rows.sum(0))
    if pos_weight is not None:
        pos = pos * pos_weight.double()
    if x.dim() == 0:
        pos, neg = pos.reshape(()), neg.reshape(())
    # neg * [ (pos / neg) t softplus(-x) + (1 - t) softplus(x) ] = torch's form with these weights
    none = F.binary_cross_entropy_with_logits(x, t, weight=neg, pos_weight=pos / neg, reduction="none")
    if weight is not None:
        none = none * weight.double()
    if sample_weight is not None:
        none = none * (sample_weight.double().unsqueeze(-1) if x.dim() >= 2 else sample_weight.double())
    if reduction == "none":
        out = none
    elif reduction == "sum":
        out = none.sum()
    else:
        out = none.mean()
    return out.to(input.dtype)
