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


# The CUDA lane's dry run (make cuda-lane-dry, FUSED_WLOSS_LANE=emu): the GPU variants of the tests
# (marker "gpu") run on the emulated CUDA kernels and CPU tensors, so the lane's scripts and test
# selection are exercised without a GPU. Tests that need a real GPU skip there (requires_real_gpu).
LANE_EMULATED = os.environ.get("FUSED_WLOSS_LANE") == "emu"
HAS_GPU = (torch.cuda.is_available() and fused_wloss.backend("cuda") == "extension") or (
    LANE_EMULATED and emulation_namespace() is not None
)


def gpu_device() -> str:
    """The device of a GPU variant's tensors: cuda, or cpu in the lane's dry run."""
    return "cpu" if LANE_EMULATED else "cuda"


def gpu_calls():
    """The context of a GPU variant's calls: as they are, or the emulated kernels in the dry run."""
    return ops.use_namespace(emulation_namespace()) if LANE_EMULATED else contextlib.nullcontext()


def gpu_param(value="cuda"):
    """A parametrisation that runs on the GPU, marked "gpu": what the CUDA lane selects (-m gpu)."""
    import pytest

    return pytest.param(value, marks=pytest.mark.gpu)


def path_params(paths: List[str]):
    """kernel_paths() as pytest parameters, the GPU one marked "gpu"."""
    return [gpu_param(p) if p == "cuda" else p for p in paths]


def skip_without_gpu() -> None:
    """Skip (or, under FUSED_WLOSS_REQUIRE_CUDA=1, fail) a GPU variant where no GPU serves it."""
    if HAS_GPU:
        return
    import pytest

    reason = "no GPU with fused_wloss CUDA kernels (torch.cuda.is_available() is False or the build has none)"
    if os.environ.get("FUSED_WLOSS_REQUIRE_CUDA") == "1":
        pytest.fail(reason + " (FUSED_WLOSS_REQUIRE_CUDA=1)")
    pytest.skip(reason)


def requires_real_gpu() -> None:
    """For tests only a real GPU can run (CUDA graphs, CUDA streams, large device memory)."""
    skip_without_gpu()
    if LANE_EMULATED:
        import pytest

        pytest.skip("needs a real GPU (this is the CUDA lane's dry run on the emulated kernels)")


def kernel_paths(gpu: bool = False) -> List[str]:
    """``cpu-<isa>`` for every instruction-set build this CPU runs, ``emu`` when built, and with
    ``gpu`` the CUDA kernels (``cuda``: skipped without a GPU, a failure under
    FUSED_WLOSS_REQUIRE_CUDA=1, as the GPU lane runs)."""
    isas = _extension.available_cpu_isas() if fused_wloss.backend("cpu") == "extension" else []
    return [f"cpu-{isa}" for isa in isas] + (["emu"] if emulation_namespace() else []) + (["cuda"] if gpu else [])


def device_of(path: str) -> str:
    return gpu_device() if path == "cuda" else "cpu"


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
        skip_without_gpu()
        with gpu_calls():
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


def classes_last(shape, gen, scale: float = 4.0, dtype=torch.float64) -> torch.Tensor:
    """Random logits of `shape` (N, C, d1, ..., dk) whose classes are innermost in memory
    (channels_last for 4-D), times `scale`."""
    moved = (shape[0], *shape[2:], shape[1])
    x = (torch.randn(moved, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return x.permute(0, len(shape) - 1, *range(1, len(shape) - 1))
