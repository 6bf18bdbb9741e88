"""Run a loss and its backward in one call, for value-and-gradient comparisons; and the kernel
paths a CPU test can run (the CPU kernels of each instruction set, the emulated CUDA kernels)."""

from __future__ import annotations

import contextlib
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


def kernel_paths() -> List[str]:
    """``cpu-<isa>`` for every instruction-set build this CPU runs, and ``emu`` when built."""
    isas = _extension.available_cpu_isas() if fused_wloss.backend("cpu") == "extension" else []
    return [f"cpu-{isa}" for isa in isas] + (["emu"] if emulation_namespace() else [])


@contextlib.contextmanager
def serve(path: str) -> Iterator[None]:
    """Calls of the public functions served by one kernel path of :func:`kernel_paths`."""
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
