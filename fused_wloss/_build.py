"""How the compiled parts of fused_wloss are built: one place for setup.py and the JIT loader.

- ``_C``: the operator schemas, the CPU operators (host code) and the Python hook that installs a
  kernel table.
  When a CUDA toolkit is found and torch has CUDA (see :func:`cuda_build_reason`), ``_C`` is a
  CUDA extension that also holds the CUDA operators (csrc/cuda), for the architectures of
  ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs', else ``DEFAULT_CUDA_ARCH_LIST``).
- ``_cuda_emu`` (tests only, with ``FUSED_WLOSS_BUILD_EMU=1``, which ``make setup`` sets): the CUDA
  operators compiled by the C++ compiler under the emulation layer (csrc/emu), run on CPU tensors.
- ``_cpu_<isa>``: the vectorised CPU kernels, one module per instruction set (default, AVX2,
  AVX-512), each compiled with its own CPU_CAPABILITY and ``-m`` flags, as ATen compiles its
  kernels. The best one this CPU runs is installed at import (see _extension.py).

This module imports nothing from fused_wloss so that setup.py can load it by path.
"""

from __future__ import annotations

import os
import platform
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

COMMON_CFLAGS = ["-O3", "-fno-math-errno"]

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# The flags ATen uses for its own per-capability kernels.
ISA_CFLAGS: Dict[str, List[str]] = {"default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]}
if _X86:
    ISA_CFLAGS["avx2"] = ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"]
    ISA_CFLAGS["avx512"] = [
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
    ]


def c_sources() -> List[str]:
    return [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "cpu", "losses_cpu.cpp")]


def isa_sources(isa: str) -> List[str]:
    return [os.path.join(CSRC, "cpu", f"kernels_{isa}.cpp")]


# at::parallel_for is a header template whose OpenMP pragmas do nothing unless the extension itself
# is compiled with -fopenmp: without it every operator would run on one thread. Linking -fopenmp
# names libgomp.so.1, which resolves to the copy torch has already loaded.
PARALLEL_FLAGS = ["-fopenmp"]


# sm_80 (A100) and sm_90 (H100/H200), with PTX for 9.0 that newer GPUs (Blackwell) JIT-compile:
# what a build compiles when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible to pick from.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# -lineinfo: compute-sanitizer and ncu reports point at source lines.
# --expt-relaxed-constexpr: std::numeric_limits in the shared math header, on the device.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DFWL_WITH_CUDA"]


def cuda_build_reason() -> Optional[str]:
    """None when the CUDA operators can be built here, else why not (printed by setup.py)."""
    if os.environ.get("FUSED_WLOSS_NO_CUDA") == "1":
        return "FUSED_WLOSS_NO_CUDA=1"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    home = cpp_extension.CUDA_HOME
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there gives a wrong guess
    # (/usr/local), which would fail at link time: insist on the toolkit's own files
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")) or not os.path.exists(
        os.path.join(home, "include", "cuda_runtime.h")
    ):
        return f"no CUDA toolkit at CUDA_HOME={home} (set CUDA_HOME to the toolkit that has bin/nvcc and include/)"
    return None


def visible_cuda_archs() -> Optional[str]:
    """The compute capabilities of the GPUs this build can see, as a TORCH_CUDA_ARCH_LIST with
    PTX for the highest (as torch's own extension builds pick them), or None without a GPU."""
    import torch

    try:
        if not torch.cuda.is_available():
            return None
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # a broken driver: build for the defaults rather than fail here
        return None
    if not caps:
        return None
    archs = [f"{major}.{minor}" for major, minor in caps]
    archs[-1] += "+PTX"
    return ";".join(archs)


def cuda_arch_list() -> str:
    """The architectures to compile for: TORCH_CUDA_ARCH_LIST when set, else the visible GPUs'
    (a T4, V100 or Blackwell GPU gets its own kernel image), else DEFAULT_CUDA_ARCH_LIST. Sets
    TORCH_CUDA_ARCH_LIST, which torch's build reads."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or visible_cuda_archs() or DEFAULT_CUDA_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    return arch


# -Wno-unknown-pragmas: the kernels' #pragma unroll means nothing to g++.
EMU_CFLAGS = ["-O2", "-fno-math-errno", "-Wno-unknown-pragmas", "-DFWL_EMULATE_CUDA"]


def extension_specs(with_cuda: bool = False, with_emu: bool = False) -> Dict[str, dict]:
    """Module name (inside the package) -> sources, extra compile flags, nvcc flags (CUDA modules)
    and extra link flags."""
    c = {"sources": c_sources(), "cflags": COMMON_CFLAGS + PARALLEL_FLAGS, "ldflags": PARALLEL_FLAGS}
    if with_cuda:
        c["sources"] = c["sources"] + [os.path.join(CSRC, "cuda", "losses_cuda.cu")]
        c["cflags"] = c["cflags"] + ["-DFWL_WITH_CUDA"]
        c["nvcc"] = list(NVCC_FLAGS)
    specs = {"_C": c}
    for isa, flags in ISA_CFLAGS.items():
        specs[f"_cpu_{isa}"] = {"sources": isa_sources(isa), "cflags": COMMON_CFLAGS + flags + ["-fvisibility=hidden"], "ldflags": []}
    if with_emu:
        specs["_cuda_emu"] = {"sources": [os.path.join(CSRC, "emu", "losses_emu.cpp")], "cflags": list(EMU_CFLAGS), "ldflags": []}
    return _with_extra_flags(specs)


def _with_extra_flags(specs: Dict[str, dict]) -> Dict[str, dict]:
    """Append FUSED_WLOSS_EXTRA_CFLAGS / FUSED_WLOSS_EXTRA_LDFLAGS (whitespace-separated) to the C++
    flags of every module: how the sanitizer lane (tests/sanitizers/) builds an instrumented copy.
    nvcc flags, where a spec has them, are left alone."""
    cflags = os.environ.get("FUSED_WLOSS_EXTRA_CFLAGS", "").split()
    ldflags = os.environ.get("FUSED_WLOSS_EXTRA_LDFLAGS", "").split()
    for spec in specs.values():
        spec["cflags"] = spec["cflags"] + cflags
        spec["ldflags"] = spec["ldflags"] + ldflags
    return specs


def all_sources() -> List[str]:
    out = []
    for d, _, files in os.walk(CSRC):
        out += [os.path.join(d, f) for f in files if f.endswith((".h", ".cpp", ".cu", ".cuh"))]
    return sorted(out)
