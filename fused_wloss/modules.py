"""``nn.Module`` drop-ins. They subclass torch's own loss modules, so constructor signatures,
``isinstance`` checks, ``state_dict`` keys and the ``weight``/``pos_weight`` buffers (which follow
``.to(device)``) are torch's; the weighting extras are keyword-only."""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, functional
from ._weighting import resolve_class_weighting

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` on :func:`fused_wloss.cross_entropy`.

    Extra keyword-only arguments ``class_weighting`` and ``gamma`` (focal loss; see
    :func:`fused_wloss.cross_entropy`);
    ``forward`` takes the optional keywords ``sample_weight`` and ``return_stats`` (then it returns
    ``(loss, CrossEntropyStats)``: the counts, class weights and normaliser the call used, for
    logging); ``reduction`` also accepts ``"sample_mean"``.
    """

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        class_weighting=None,
        gamma: float = 0.0,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        resolve_class_weighting(class_weighting, loss="cross_entropy")  # fail at construction
        self.class_weighting = class_weighting
        self.gamma = _checks.check_focal_ce(gamma, label_smoothing, prob_target=False)

    def forward(self, input, target, *, sample_weight: Optional[torch.Tensor] = None,
                return_stats: bool = False):
        return functional.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            sample_weight=sample_weight, class_weighting=self.class_weighting,
            return_stats=return_stats, gamma=self.gamma,
        )

    def extra_repr(self) -> str:
        focal = f", gamma={self.gamma}" if self.gamma else ""
        return f"reduction={self.reduction!r}, class_weighting={self.class_weighting!r}{focal}"


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss` on :func:`fused_wloss.binary_cross_entropy_with_logits`.

    Extra keyword-only arguments ``class_weighting``, ``gamma`` and ``alpha`` (sigmoid focal loss);
    ``forward`` takes the optional keywords
    ``sample_weight`` and ``return_stats`` (then it returns ``(loss, BCEStats)``).
    """

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        pos_weight: Optional[torch.Tensor] = None,
        *,
        class_weighting=None,
        gamma: float = 0.0,
        alpha: Optional[float] = None,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        resolve_class_weighting(class_weighting, loss="binary_cross_entropy_with_logits")
        self.class_weighting = class_weighting
        self.gamma, self.alpha = _checks.check_focal_bce(gamma, alpha)

    def forward(self, input, target, *, sample_weight: Optional[torch.Tensor] = None,
                return_stats: bool = False):
        return functional.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight,
            sample_weight=sample_weight, class_weighting=self.class_weighting,
            return_stats=return_stats, gamma=self.gamma, alpha=self.alpha,
        )

    def extra_repr(self) -> str:
        focal = f", gamma={self.gamma}, alpha={self.alpha}" if self.gamma or self.alpha is not None else ""
        return f"reduction={self.reduction!r}, class_weighting={self.class_weighting!r}{focal}"
