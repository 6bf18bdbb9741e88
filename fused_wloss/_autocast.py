"""The loss dtype under ``torch.autocast``.

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


def loss_dtype(input: torch.Tensor) -> Optional[torch.dtype]:
    """float32 when autocast is on for the input's device type and the input is float16 or
    bfloat16; None (the input's dtype) otherwise, as outside autocast nothing changes.

    Traceable: under torch.compile the autocast state is read at trace time and guarded on, also
    for an autocast region inside the compiled function."""
    if input.dtype not in _HALF:
        return None
    device_type = input.device.type
    if not torch.amp.is_autocast_available(device_type):
        return None
    return torch.float32 if torch.is_autocast_enabled(device_type) else None


def result_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype of the loss of a call on ``input``: float32 under autocast (see loss_dtype), else
    the input's."""
    return loss_dtype(input) or input.dtype
