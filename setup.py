"""Build fused_wloss: the Python package and its compiled operators (see fused_wloss/_build.py).

`pip install --no-build-isolation -e .` (what `make setup` runs) builds against the torch already
installed. MAX_JOBS caps ninja's parallel compile jobs. If the build is skipped or fails, the package
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
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    exts = []
    for name, s in build.extension_specs().items():
        rel = [os.path.relpath(p, build.ROOT) for p in s["sources"]]
        exts.append(CppExtension(f"fused_wloss.{name}", rel, extra_compile_args={"cxx": s["cflags"]},
                                 extra_link_args=s["ldflags"]))
        print(f"[fused_wloss] extension fused_wloss.{name}: {' '.join(rel)} | {' '.join(s['cflags'])}", file=sys.stderr)
    print(f"[fused_wloss] MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}", file=sys.stderr)
    return exts, {"build_ext": BuildExtension}


if os.environ.get("FUSED_WLOSS_NO_EXTENSION") == "1":
    print("[fused_wloss] FUSED_WLOSS_NO_EXTENSION=1: pure-Python install (the reference serves every call)", file=sys.stderr)
    setup()
else:
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
