"""The loss dtype under ``torch.autocast``, and of BCE with targets of another dtype.

torch runs ``cross_entropy`` and ``binary_cross_entropy_with_logits`` under autocast's float32
policy: float16 and bfloat16 arguments are cast to float32 and the loss comes back in float32, so
that ``GradScaler`` can scale it (a float16 loss times 2^16 overflows) and a mean over many
elements keeps float32's precision. fused_wloss returns the same float32 loss, but without torch's
float32 copy of the logits: the kernels read half precision, accumulate in float32 and write the
loss straight from their accumulators (the operators' ``loss_dtype`` argument). The gradient of the
logits keeps the logits' dtype, as autocast's cast would give it.
"""

from __future__ import annotations

from typing import Optional

import torch

_HALF = (torch.float16, torch.bfloat16)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (False where autocast has no such type)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def loss_dtype(input: torch.Tensor) -> Optional[torch.dtype]:
    """float32 when autocast is on for the input's device type and the input is float16 or
    bfloat16; None (the input's dtype) otherwise, as outside autocast nothing changes.

    Traceable: under torch.compile the autocast state is read at trace time and guarded on, also
    for an autocast region inside the compiled function."""
    return torch.float32 if input.dtype in _HALF and _autocast_on(input.device.type) else None


def result_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype of the loss of a call on ``input``: float32 under autocast (see loss_dtype), else
    the input's."""
    return loss_dtype(input) or input.dtype


def bce_result_dtype(input: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """The dtype of a BCE loss, as torch's function gives it: the target's dtype (float32 targets
    with bfloat16 logits give a float32 loss, float64 logits with float32 targets a float32 one);
    under autocast a float16/bfloat16 target counts as float32, as autocast casts it."""
    return torch.float32 if target.dtype in _HALF and _autocast_on(input.device.type) else target.dtype


def bce_loss_dtype(input: torch.Tensor, target: torch.Tensor) -> Optional[torch.dtype]:
    """The BCE operators' ``loss_dtype`` for a call the kernels serve (targets of the input's
    dtype, or float32 with half-precision logits)."""
    dtype = bce_result_dtype(input, target)
    return None if dtype == input.dtype else dtype


def ce_prob_result_dtype(input: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """The dtype of a cross-entropy loss with probability targets, as torch's: the logits' dtype
    (float32 under autocast, see result_dtype) promoted with the targets' (bfloat16 logits with
    float32 targets give a float32 loss)."""
    return torch.promote_types(result_dtype(input), target.dtype)


def ce_prob_loss_dtype(input: torch.Tensor, target: torch.Tensor) -> Optional[torch.dtype]:
    """The probability-target operators' ``loss_dtype`` for a call the kernels serve."""
    dtype = ce_prob_result_dtype(input, target)
    return None if dtype == input.dtype else dtype
