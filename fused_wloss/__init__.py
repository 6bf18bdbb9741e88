"""fused_wloss: fused, weighted classification losses for PyTorch.

Drop-in replacements for ``torch.nn.functional.cross_entropy``,
``binary_cross_entropy_with_logits`` and their modules, with static, per-sample and dynamic
(per-batch) class weights built in. :mod:`fused_wloss.reference` is the pure-PyTorch oracle.
"""

from . import _extension, reference
from ._backend import backend
from ._checks import set_target_validation, target_validation_enabled
from ._weighting import BatchWeighting
from .functional import binary_cross_entropy_with_logits, cross_entropy
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .modules import BCEWithLogitsLoss, CrossEntropyLoss

__version__ = "0.1.0"

_extension.load()
cpu_isa = _extension.cpu_isa

__all__ = [
    "BCEWithLogitsLoss",
    "BatchWeighting",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "backend",
    "binary_cross_entropy_with_logits",
    "cpu_isa",
    "cross_entropy",
    "linear_cross_entropy",
    "reference",
    "set_target_validation",
    "target_validation_enabled",
]
