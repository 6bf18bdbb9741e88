"""Which implementation serves a call: the compiled operators or the pure-PyTorch reference.

``FUSED_WLOSS_BACKEND=reference`` forces the reference everywhere. Otherwise a device is served by
the extension when the compiled ``fused_wloss._C`` module is loaded and has kernels for it.
"""

from __future__ import annotations

import os
from typing import Union

import torch

__all__ = ["backend"]

_FORCE_REFERENCE = os.environ.get("FUSED_WLOSS_BACKEND", "").strip().lower() == "reference"

# Device types with compiled kernels; filled in by the extension loader.
_extension_devices: set = set()


def register_extension_device(device_type: str) -> None:
    _extension_devices.add(device_type)


def backend(device: Union[str, torch.device] = "cpu") -> str:
    """``"extension"`` if compiled kernels serve ``device``, else ``"reference"``."""
    device_type = torch.device(device).type
    if not _FORCE_REFERENCE and device_type in _extension_devices:
        return "extension"
    return "reference"


def use_extension(device: torch.device) -> bool:
    return not _FORCE_REFERENCE and device.type in _extension_devices
