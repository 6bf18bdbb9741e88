"""Dynamic class weights: weights formed from the class counts of the current batch.

A scheme maps the count ``n_c`` of a class (a float: probability targets give fractional
counts) to a weight ``w_c``. The same formulas are written in C++ in ``csrc/fused_wloss_math.h``;
the two are kept in step by the tests, which compare both against the formulas written out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

__all__ = ["BatchWeighting", "resolve_class_weighting"]

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

    ``class_weighting="inverse"`` is ``BatchWeighting("inverse")`` and ``class_weighting="balanced"``
    is ``BatchWeighting("inverse", balanced=True)``.
    """

    scheme: str = "inverse"
    smoothing: float = 1.0
    beta: float = 0.999
    balanced: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEME_CODES:
            raise ValueError(
                f"BatchWeighting: scheme must be one of {sorted(SCHEME_CODES)}, got {self.scheme!r}"
            )
        smoothing = float(self.smoothing)
        if not (math.isfinite(smoothing) and smoothing >= _MIN_SMOOTHING):
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

    @property
    def scheme_code(self) -> int:
        return SCHEME_CODES[self.scheme]

    def weights(self, counts: torch.Tensor) -> torch.Tensor:
        """The weight of every class from a tensor of (float) class counts; same shape."""
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
