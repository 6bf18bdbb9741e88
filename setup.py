"""Build fused_wloss: the Python package and its compiled operators (see fused_wloss/_build.py).

`pip install --no-build-isolation -e .` (what `make setup` runs) builds against the torch already
installed. MAX_JOBS caps ninja's parallel compile jobs. With a CUDA toolkit (CUDA_HOME) and a CUDA
build of torch, the CUDA operators are compiled into fused_wloss._C for TORCH_CUDA_ARCH_LIST
(default 8.0;9.0); FUSED_WLOSS_NO_CUDA=1 skips them and FUSED_WLOSS_REQUIRE_CUDA=1 makes their
absence an error. FUSED_WLOSS_BUILD_EMU=1 also builds the test-only fused_wloss._cuda_emu. If the build is skipped or fails, the package
still imports and serves every call from fused_wloss.reference.
"""

import importlib.util
import os
import sys

from setuptools import setup

spec = importlib.util.spec_from_file_location(
    "fused_wloss_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_wloss", "_build.py")
)
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def extensions():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    reason = build.cuda_build_reason()
    if reason is None:
        print(f"[fused_wloss] CUDA kernels: building for TORCH_CUDA_ARCH_LIST={build.cuda_arch_list()}", file=sys.stderr)
    elif os.environ.get("FUSED_WLOSS_REQUIRE_CUDA") == "1":
        sys.exit(f"[fused_wloss] FUSED_WLOSS_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    else:
        print(f"[fused_wloss] CUDA kernels: not built ({reason})", file=sys.stderr)
    with_emu = os.environ.get("FUSED_WLOSS_BUILD_EMU") == "1"
    exts = []
    for name, s in build.extension_specs(with_cuda=reason is None, with_emu=with_emu).items():
        rel = [os.path.relpath(p, build.ROOT) for p in s["sources"]]
        if "nvcc" in s:
            exts.append(CUDAExtension(f"fused_wloss.{name}", rel, extra_compile_args={"cxx": s["cflags"], "nvcc": s["nvcc"]},
                                      extra_link_args=s["ldflags"]))
        else:
            exts.append(CppExtension(f"fused_wloss.{name}", rel, extra_compile_args={"cxx": s["cflags"]},
                                     extra_link_args=s["ldflags"]))
        nvcc = f" | nvcc {' '.join(s['nvcc'])}" if "nvcc" in s else ""
        print(f"[fused_wloss] extension fused_wloss.{name}: {' '.join(rel)} | {' '.join(s['cflags'])}{nvcc}", file=sys.stderr)
    print(f"[fused_wloss] MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}", file=sys.stderr)
    return exts, {"build_ext": BuildExtension}


if os.environ.get("FUSED_WLOSS_NO_EXTENSION") == "1":
    print("[fused_wloss] FUSED_WLOSS_NO_EXTENSION=1: pure-Python install (the reference serves every call)", file=sys.stderr)
    setup()
else:
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
