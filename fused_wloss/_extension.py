"""Loading the compiled operators.

Order: the modules built by ``pip install`` (``fused_wloss._C`` and ``fused_wloss._cpu_<isa>``);
where they are missing, or with ``FUSED_WLOSS_JIT=1``, a JIT build of the same sources through
``torch.utils.cpp_extension.load`` into ``FUSED_WLOSS_BUILD_DIR`` (default
``~/.cache/fused_wloss/torch-<version>``). Of the per-ISA kernel modules, the best one that this CPU
runs (``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``) is
installed. When nothing can be loaded, fused_wloss warns once and the reference serves every call.
A build with CUDA kernels (see ``_build.cuda_build_reason``) serves CUDA tensors too;
``FUSED_WLOSS_REQUIRE_CUDA=1`` makes a build without them an error instead of a silent fallback.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Dict, List, Optional

import torch

from . import _backend, _build

_C = None
_isa_modules: Dict[str, object] = {}
_load_error: Optional[str] = None


def _import_prebuilt():
    C = importlib.import_module("fused_wloss._C")
    mods = {}
    for isa in _build.ISA_CFLAGS:
        try:
            mods[isa] = importlib.import_module(f"fused_wloss._cpu_{isa}")
        except ImportError:
            pass
    return C, mods


def _jit_build():
    from torch.utils import cpp_extension

    root = os.environ.get("FUSED_WLOSS_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fused_wloss", f"torch-{torch.__version__}"
    )
    verbose = os.environ.get("FUSED_WLOSS_VERBOSE_BUILD") == "1"
    cuda_reason = _build.cuda_build_reason()
    if cuda_reason is None:
        _build.cuda_arch_list()
    elif os.environ.get("FUSED_WLOSS_REQUIRE_CUDA") == "1":
        raise RuntimeError(f"FUSED_WLOSS_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {cuda_reason}")
    specs = _build.extension_specs(with_cuda=cuda_reason is None)

    def build(name):
        directory = os.path.join(root, name.lstrip("_"))
        os.makedirs(directory, exist_ok=True)
        return cpp_extension.load(
            name=f"fused_wloss{name}", sources=specs[name]["sources"],
            extra_cflags=specs[name]["cflags"], extra_ldflags=specs[name]["ldflags"],
            extra_cuda_cflags=specs[name].get("nvcc"), build_directory=directory, verbose=verbose,
        )

    C = build("_C")
    mods = {}
    # FUSED_WLOSS_JIT_ISAS=best builds only the CPU kernels this CPU prefers (the CUDA lane's quick
    # build); a comma-separated list builds those; unset or "all", every instruction set
    wanted = os.environ.get("FUSED_WLOSS_JIT_ISAS", "all").strip().lower()
    if wanted == "best":
        isas = preferred_cpu_isas()[:1]
    elif wanted == "all":
        isas = list(_build.ISA_CFLAGS)
    else:
        isas = [i for i in (w.strip() for w in wanted.split(",")) if i]
        unknown = [i for i in isas if i not in _build.ISA_CFLAGS]
        if unknown:
            raise ValueError(f"FUSED_WLOSS_JIT_ISAS must be 'all', 'best' or a list of {sorted(_build.ISA_CFLAGS)}, "
                             f"got {wanted!r}")
    for isa in isas:
        try:
            mods[isa] = build(f"_cpu_{isa}")
        except Exception as e:  # an ISA the compiler cannot target: the others still serve
            warnings.warn(f"fused_wloss: JIT build of the {isa} CPU kernels failed: {e}", stacklevel=3)
    return C, mods


def preferred_cpu_isas() -> List[str]:
    """The kernel builds this CPU runs, best first."""
    capability = torch.backends.cpu.get_cpu_capability()
    order = {"AVX512": ["avx512", "avx2", "default"], "AVX2": ["avx2", "default"]}.get(capability, ["default"])
    return [isa for isa in order if isa in _build.ISA_CFLAGS]


def available_cpu_isas() -> List[str]:
    """The loaded kernel builds this CPU runs, best first."""
    return [isa for isa in preferred_cpu_isas() if isa in _isa_modules]


def cpu_isa() -> Optional[str]:
    """The instruction set of the CPU kernels in use, or None without the extension."""
    return _C.cpu_kernels_isa() if _C is not None else None


def use_cpu_isa(isa: str) -> None:
    """Serve CPU calls from the kernels built for ``isa`` (one of :func:`available_cpu_isas`)."""
    if isa not in available_cpu_isas():
        raise ValueError(f"fused_wloss: cpu isa must be one of {available_cpu_isas()}, got {isa!r}")
    _C.set_cpu_kernels(_isa_modules[isa].kernel_table)


def load() -> None:
    global _C, _isa_modules, _load_error
    if os.environ.get("FUSED_WLOSS_BACKEND", "").strip().lower() == "reference":
        _load_error = "FUSED_WLOSS_BACKEND=reference"
        return
    errors = []
    C = None
    if os.environ.get("FUSED_WLOSS_JIT") != "1":
        try:
            C, mods = _import_prebuilt()
        except ImportError as e:
            errors.append(f"no prebuilt module ({e})")
    if C is None:
        try:
            C, mods = _jit_build()
        except Exception as e:
            errors.append(f"JIT build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e})")
    if C is None:
        _load_error = "; ".join(errors)
        warnings.warn(
            f"fused_wloss: compiled kernels unavailable: {_load_error}. Every call uses the pure-PyTorch "
            "reference (fused_wloss.backend() == 'reference').", stacklevel=3,
        )
        return
    _C, _isa_modules = C, mods
    isas = available_cpu_isas()
    if not isas:
        _load_error = "no CPU kernel module could be loaded"
        warnings.warn(f"fused_wloss: {_load_error}; the reference serves CPU calls", stacklevel=3)
        return
    use_cpu_isa(isas[0])
    from . import ops  # noqa: F401  (registers the fake kernels and autograd formulas)

    _backend.register_extension_device("cpu")
    if has_cuda_kernels():
        _backend.register_extension_device("cuda")
    elif os.environ.get("FUSED_WLOSS_REQUIRE_CUDA") == "1":
        raise RuntimeError("fused_wloss: FUSED_WLOSS_REQUIRE_CUDA=1 but the loaded extension has no CUDA kernels "
                           f"(built without them: {_build.cuda_build_reason() or 'rebuild it'})")


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA implementations of the operators."""
    return _C is not None and bool(_C.has_cuda_kernels())


def load_error() -> Optional[str]:
    return _load_error
