"""How the compiled parts of fused_wloss are built: one place for setup.py and the JIT loader.

- ``_C``: the operator schemas, the CPU operators (host code) and the Python hook that installs a
  kernel table.
- ``_cpu_<isa>``: the vectorised CPU kernels, one module per instruction set (default, AVX2,
  AVX-512), each compiled with its own CPU_CAPABILITY and ``-m`` flags, as ATen compiles its
  kernels. The best one this CPU runs is installed at import (see _extension.py).

This module imports nothing from fused_wloss so that setup.py can load it by path.
"""

from __future__ import annotations

import os
import platform
from typing import Dict, List

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


def extension_specs() -> Dict[str, dict]:
    """Module name (inside the package) -> sources, extra compile flags and extra link flags."""
    specs = {"_C": {"sources": c_sources(), "cflags": COMMON_CFLAGS + PARALLEL_FLAGS, "ldflags": PARALLEL_FLAGS}}
    for isa, flags in ISA_CFLAGS.items():
        specs[f"_cpu_{isa}"] = {"sources": isa_sources(isa), "cflags": COMMON_CFLAGS + flags + ["-fvisibility=hidden"], "ldflags": []}
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
