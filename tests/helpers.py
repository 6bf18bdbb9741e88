"""Run a loss and its backward in one call, for value-and-gradient comparisons; and the kernel
paths a CPU test can run (the CPU kernels of each instruction set, the emulated CUDA kernels)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Optional

import torch

import fused_wloss
from fused_wloss import _extension, ops


def emulation_namespace() -> Optional[str]:
    """The namespace of the emulated CUDA kernels (fused_wloss._cuda_emu), None when not built."""
    try:
        return ops.load_emulation() if fused_wloss.backend("cpu") == "extension" else None
    except ImportError:
        return None


HAS_GPU = torch.cuda.is_available() and fused_wloss.backend("cuda") == "extension"


def kernel_paths(gpu: bool = False) -> List[str]:
    """``cpu-<isa>`` for every instruction-set build this CPU runs, ``emu`` when built, and with
    ``gpu`` the CUDA kernels (``cuda``: skipped without a GPU, a failure under
    FUSED_WLOSS_REQUIRE_CUDA=1, as the GPU lane runs)."""
    isas = _extension.available_cpu_isas() if fused_wloss.backend("cpu") == "extension" else []
    return [f"cpu-{isa}" for isa in isas] + (["emu"] if emulation_namespace() else []) + (["cuda"] if gpu else [])


def device_of(path: str) -> str:
    return "cuda" if path == "cuda" else "cpu"


def on_device(path: str, *values):
    """The tensors among ``values`` (and the tensor values of dicts among them) moved to the device
    of ``path``; other values as they are."""
    device = device_of(path)

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, dict):
            return {k: move(w) for k, w in v.items()}
        return v
    return tuple(move(v) for v in values)


@contextlib.contextmanager
def serve(path: str) -> Iterator[None]:
    """Calls of the public functions served by one kernel path of :func:`kernel_paths` (for
    ``cuda``, calls on CUDA tensors: see :func:`on_device`)."""
    if path == "cuda":
        if not HAS_GPU:
            import pytest

            reason = "no GPU with fused_wloss CUDA kernels"
            if os.environ.get("FUSED_WLOSS_REQUIRE_CUDA") == "1":
                pytest.fail(reason + " (FUSED_WLOSS_REQUIRE_CUDA=1)")
            pytest.skip(reason)
        yield
        return
    if path == "emu":
        with ops.use_namespace(emulation_namespace()):
            yield
        return
    before = _extension.cpu_isa()
    _extension.use_cpu_isa(path[len("cpu-"):])
    try:
        yield
    finally:
        _extension.use_cpu_isa(before.lower())


def value_and_grad(fn, sample, seed: int = 1234):
    """``fn(*sample.args, **sample.kwargs)`` and the gradient of its input, on fresh leaves.

    The backward uses a fixed random ``grad_output`` so that "none" reductions are checked with a
    non-uniform upstream gradient.
    """
    s = sample.clone(requires_grad=True)
    out = fn(*s.args, **s.kwargs)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.rand(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device) + 0.5
    (grad,) = torch.autograd.grad(out, s.args[0], grad_out)
    return out.detach(), grad


def assert_close(actual, expected, dtype, what=""):
    tol = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}.get(dtype, (2e-2, 2e-3))
    torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1], equal_nan=True, msg=lambda m: f"{what}: {m}")
