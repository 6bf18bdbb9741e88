"""Dynamic class weights: weights formed from the class counts of the current batch.

A scheme maps the count ``n_c`` of a class (a float: probability targets give fractional
counts) to a weight ``w_c``. The same formulas are written in C++ in ``csrc/fused_wloss_math.h``;
the two are kept in step by the tests, which compare both against the formulas written out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, NamedTuple, Optional, Sequence, Union

import torch

__all__ = ["BatchWeighting", "BCEStats", "CrossEntropyStats", "resolve_class_weighting"]

# Integer codes shared with the C++ kernels (see WeightScheme in csrc/fused_wloss_math.h).
SCHEME_CODES = {"inverse": 1, "inverse_sqrt": 2, "effective_number": 3}

# The smallest smoothing whose reciprocal (the weight of an absent class) is finite in float32.
_MIN_SMOOTHING = torch.finfo(torch.float32).tiny


@dataclasses.dataclass(frozen=True)
class BatchWeighting:
    """Class weights computed from each call's own targets.

    Args:
        scheme: how a class count ``n`` becomes a weight.

            - ``"inverse"``: ``1 / (n + smoothing)``
            - ``"inverse_sqrt"``: ``1 / sqrt(n + smoothing)``
            - ``"effective_number"``: ``(1 - beta) / (1 - beta ** max(n, 1))``, the "effective number
              of samples" of Cui et al. (CVPR 2019). A class seen fewer than once (absent, or a
              fractional count from probability targets) gets the weight of a single sample, 1.
        smoothing: added to the count by the inverse schemes; must be > 0 so that an absent class
            gets a finite weight. ``BatchWeighting("inverse")`` is ``1 / (n + 1)``.
        beta: the decay of ``effective_number``, in ``[0, 1)``.
        balanced: binary cross-entropy only. Weight the positive and the negative targets of each
            label separately, from the count of positives ``sum(t)`` and of negatives
            ``sum(1 - t)`` of that label.
        sync: count over every process of a ``torch.distributed`` group instead of over this
            process's batch alone. The counts (and the normaliser of ``"mean"``/``"sample_mean"``)
            are summed across the group with one ``all_reduce`` before the weights are formed, so
            that the gradient DistributedDataParallel averages over the ranks equals the gradient
            of the same loss on the concatenated global batch in one process. See
            :mod:`fused_wloss.distributed` for the exact contract. Without an initialised process
            group it counts the local batch, as ``sync=False``.
        process_group: the group to count over when ``sync=True``; None is the default group.
            It is a handle, not a setting: it takes no part in ``==``, ``hash`` or ``repr``, and
            a deep copy shares it.

    ``class_weighting="inverse"`` is ``BatchWeighting("inverse")`` and ``class_weighting="balanced"``
    is ``BatchWeighting("inverse", balanced=True)``.
    """

    scheme: str = "inverse"
    smoothing: float = 1.0
    beta: float = 0.999
    balanced: bool = False
    sync: bool = False
    process_group: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEME_CODES:
            raise ValueError(
                f"BatchWeighting: scheme must be one of {sorted(SCHEME_CODES)}, got {self.scheme!r}"
            )
        smoothing = float(self.smoothing)
        if not (_MIN_SMOOTHING <= smoothing < math.inf):  # no math.isfinite: see _checks._check_gamma
            raise ValueError(
                f"BatchWeighting: smoothing must be a finite number >= {_MIN_SMOOTHING:.3g} (so that "
                f"an absent class gets a weight that is finite in float32), got {self.smoothing!r}"
            )
        beta = float(self.beta)
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"BatchWeighting: beta must be in [0, 1), got {self.beta!r}")
        object.__setattr__(self, "smoothing", smoothing)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "balanced", bool(self.balanced))
        if not isinstance(self.sync, bool):
            raise TypeError(f"BatchWeighting: sync must be a bool, got {type(self.sync).__name__}")
        if self.process_group is not None and not self.sync:
            raise ValueError(
                "BatchWeighting: process_group is used only to synchronise the counts; pass "
                "sync=True with it, got sync=False"
            )

    def __deepcopy__(self, memo) -> "BatchWeighting":
        # A process group cannot be copied; a copy of the spec counts over the same group.
        return dataclasses.replace(self)

    @property
    def scheme_code(self) -> int:
        return SCHEME_CODES[self.scheme]

    def weights(self, counts: torch.Tensor) -> torch.Tensor:
        """The weight of every class from a tensor of (float) class counts; same shape.

        A count below 0 (targets outside [0, 1] can sum to one) counts as 0, so that
        ``1 / (count + smoothing)`` stays finite; a NaN count gives a NaN weight."""
        counts = torch.clamp(counts, min=0.0)
        if self.scheme == "inverse":
            return torch.reciprocal(counts + self.smoothing)
        if self.scheme == "inverse_sqrt":
            return torch.rsqrt(counts + self.smoothing)
        # effective_number: (1 - beta) / (1 - beta^n), with 1 - beta^n = -expm1(n log beta) for
        # accuracy when beta is close to 1. beta == 0 gives log(0) = -inf and a weight of 1.
        n = torch.clamp(counts, min=1.0)
        log_beta = math.log(self.beta) if self.beta > 0.0 else -math.inf
        return (1.0 - self.beta) / -torch.expm1(n * log_beta)


ClassWeighting = Union[None, str, BatchWeighting]


# ---- what a call applied: returned with ``return_stats=True`` --------------------------------------

def _per_class_items(name: str, values: torch.Tensor, classes: Optional[Sequence[int]]):
    indices = range(values.shape[0]) if classes is None else classes
    return {f"{name}/{int(c)}": values[int(c)] for c in indices}


class CrossEntropyStats(NamedTuple):
    """The class counts, class weights and normaliser one cross-entropy call used.

    Every field is a detached tensor on the input's device, in the accumulation dtype (float64 for
    float64 logits, float32 otherwise); forming them needs no host synchronisation.

    Attributes:
        counts: ``(C,)``, the count ``n_c`` of non-ignored targets of each class over all samples
            and positions (the summed probabilities for probability targets); with
            ``BatchWeighting(sync=True)``, over the whole process group.
        class_weight: ``(C,)``, the class weights applied, ``W_c = weight[c] * d_c``: the static
            ``weight`` times the dynamic weight (ones where the call had neither).
        normalizer: ``()``, what the summed loss was divided by: ``sum_i s_i v_i W[t_i]`` for
            ``"mean"`` (the sample weights, or the element count, for probability targets), the
            number of non-ignored elements for ``"sample_mean"``, 1 for ``"sum"`` and ``"none"``;
            with ``sync=True``, the group's.
    """

    counts: torch.Tensor
    class_weight: torch.Tensor
    normalizer: torch.Tensor

    def to_dict(self, prefix: str = "", classes: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """Flat ``{name: 0-d tensor}`` for ``LightningModule.log_dict`` or a metrics logger:
        ``{prefix}count/{c}``, ``{prefix}weight/{c}`` for every class (or those in ``classes``)
        and ``{prefix}normalizer``. The values stay on the device; turning them into numbers is
        the logger's business (Lightning does it when it writes them)."""
        out = _per_class_items(prefix + "count", self.counts, classes)
        out.update(_per_class_items(prefix + "weight", self.class_weight, classes))
        out[prefix + "normalizer"] = self.normalizer
        return out


class BCEStats(NamedTuple):
    """The per-label counts, dynamic weights and normaliser one binary cross-entropy call used.

    Detached tensors on the input's device in the accumulation dtype; ``L`` is the number of
    labels (the size of the last dimension; 1 for a 0-d or 1-D input).

    Attributes:
        pos_counts: ``(L,)``, ``sum(t)`` of each label over the samples (the group's with
            ``sync=True``).
        neg_counts: ``(L,)``, ``sum(1 - t)`` of each label.
        neg_weight: ``(L,)``, the dynamic weight ``a`` of the negative part of each label (ones
            without ``class_weighting``). The static ``weight`` and ``pos_weight`` are not folded
            in: they are the caller's own tensors, of any broadcastable shape.
        pos_weight: ``(L,)``, the dynamic weight of the positive part (equal to ``neg_weight``
            unless ``balanced``).
        normalizer: ``()``, the element count for ``"mean"``/``"sample_mean"`` (the group's with
            ``sync=True``), 1 for ``"sum"`` and ``"none"``.
    """

    pos_counts: torch.Tensor
    neg_counts: torch.Tensor
    neg_weight: torch.Tensor
    pos_weight: torch.Tensor
    normalizer: torch.Tensor

    def to_dict(self, prefix: str = "", labels: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """Flat ``{name: 0-d tensor}``: ``{prefix}pos_count/{l}``, ``neg_count/{l}``,
        ``pos_weight/{l}``, ``neg_weight/{l}`` for every label (or those in ``labels``) and
        ``{prefix}normalizer``."""
        out = _per_class_items(prefix + "pos_count", self.pos_counts, labels)
        out.update(_per_class_items(prefix + "neg_count", self.neg_counts, labels))
        out.update(_per_class_items(prefix + "pos_weight", self.pos_weight, labels))
        out.update(_per_class_items(prefix + "neg_weight", self.neg_weight, labels))
        out[prefix + "normalizer"] = self.normalizer
        return out

_NAMED = {
    "inverse": BatchWeighting("inverse"),
    "inverse_sqrt": BatchWeighting("inverse_sqrt"),
    "effective_number": BatchWeighting("effective_number"),
    "balanced": BatchWeighting("inverse", balanced=True),
}


def resolve_class_weighting(class_weighting: ClassWeighting, *, loss: str) -> Optional[BatchWeighting]:
    """Turn the user's ``class_weighting`` argument into a ``BatchWeighting`` (or None)."""
    if class_weighting is None:
        return None
    if isinstance(class_weighting, BatchWeighting):
        spec = class_weighting
    elif isinstance(class_weighting, str):
        spec = _NAMED.get(class_weighting)
        if spec is None:
            raise ValueError(
                f"{loss}: class_weighting must be None, a BatchWeighting or one of "
                f"{sorted(_NAMED)}, got {class_weighting!r}"
            )
    else:
        raise TypeError(
            f"{loss}: class_weighting must be None, a str or a fused_wloss.BatchWeighting, "
            f"got {type(class_weighting).__name__}"
        )
    if spec.balanced and loss == "cross_entropy":
        raise ValueError(
            "cross_entropy: class_weighting 'balanced' (separate positive/negative weights) applies "
            "to binary_cross_entropy_with_logits only; use 'inverse' for softmax cross-entropy"
        )
    return spec
