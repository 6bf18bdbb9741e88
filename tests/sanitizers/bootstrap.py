"""The sanitized test process (started by tests/sanitizers/run.py with the ASan runtime preloaded).

Loads fused_wloss from the instrumented JIT build, builds and installs the test-only modules that
fused_wloss does not load itself (``fused_wloss._cuda_emu``), checks that every compiled fused_wloss
module in the process is the instrumented copy, runs pytest with the given arguments, and checks
again at the end (a test could load a module lazily).
"""

from __future__ import annotations

import os
import sys
import time

# The compiler and ninja that the JIT build starts are not instrumented: no ASan for them.
os.environ.pop("LD_PRELOAD", None)

BUILD_DIR = os.path.realpath(os.environ["FUSED_WLOSS_BUILD_DIR"])
# The checkout this script belongs to, ahead of any installed fused_wloss (python puts the script's
# own directory first on sys.path, not the working directory).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
sys.path.insert(0, ROOT)


def _mapped_files():
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if len(line.split()) >= 6})


def compiled_modules(package_dir: str):
    """The shared objects of fused_wloss mapped into this process: JIT builds (fused_wloss*.so)
    and the modules built in place (fused_wloss/_*.so)."""
    return [p for p in _mapped_files() if p.endswith(".so") and (
        os.path.basename(p).startswith("fused_wloss") or os.path.dirname(os.path.realpath(p)) == package_dir)]


def stray_modules(package_dir: str):
    return [p for p in compiled_modules(package_dir) if not os.path.realpath(p).startswith(BUILD_DIR + os.sep)]


def install_test_only_modules(fused_wloss, _build) -> None:
    """JIT-build (instrumented, through the same FUSED_WLOSS_EXTRA_* flags) the modules of
    extension_specs(with_emu=True) that fused_wloss itself does not load, and put them in
    sys.modules where ``importlib.import_module("fused_wloss.<name>")`` finds them."""
    from torch.utils import cpp_extension

    try:
        specs = _build.extension_specs(with_emu=True)
    except TypeError:  # no test-only modules in this version of _build
        return
    for name, spec in specs.items():
        if name == "_C" or name.startswith("_cpu_"):
            continue  # fused_wloss's own loader built these
        module = cpp_extension.load(
            name=f"fused_wloss{name}", sources=spec["sources"], extra_cflags=spec["cflags"],
            extra_ldflags=spec["ldflags"], build_directory=_jit_dir(name),
        )
        sys.modules[f"fused_wloss.{name}"] = module
        setattr(fused_wloss, name, module)


def _jit_dir(name: str) -> str:
    path = os.path.join(BUILD_DIR, name.lstrip("_"))
    os.makedirs(path, exist_ok=True)
    return path


class StrayModuleCheck:
    """A pytest plugin: fail the session if a non-instrumented fused_wloss module got loaded."""

    def __init__(self, package_dir: str):
        self.package_dir = package_dir

    def pytest_sessionfinish(self, session, exitstatus):
        stray = stray_modules(self.package_dir)
        if stray:
            print(f"\nsanitizers: FAILED, tests loaded fused_wloss modules from outside {BUILD_DIR}: {stray}",
                  flush=True)
            session.exitstatus = 1


def main(argv) -> int:
    print("sanitizers: building (or reusing) the instrumented modules ...", flush=True)
    start = time.monotonic()
    import fused_wloss
    from fused_wloss import _build, _extension

    if not os.path.realpath(fused_wloss.__file__).startswith(ROOT + os.sep):
        print(f"sanitizers: imported fused_wloss from {fused_wloss.__file__}, not from {ROOT}", flush=True)
        return 1
    if fused_wloss.backend("cpu") != "extension":
        print(f"sanitizers: the instrumented build did not load: {_extension.load_error()}", flush=True)
        return 1
    install_test_only_modules(fused_wloss, _build)
    print(f"sanitizers: builds ready in {time.monotonic() - start:.0f} s", flush=True)

    package_dir = os.path.dirname(os.path.realpath(fused_wloss.__file__))
    ours = compiled_modules(package_dir)
    stray = stray_modules(package_dir)
    if stray:
        print(f"sanitizers: modules from outside {BUILD_DIR} are loaded: {stray}", flush=True)
        return 1
    try:
        expected = _build.extension_specs(with_emu=True)
    except TypeError:
        expected = _build.extension_specs()
    for name in expected:
        if not any(os.path.basename(p) == f"fused_wloss{name}.so" for p in ours):
            print(f"sanitizers: module {name} is not loaded from {BUILD_DIR}: {ours}", flush=True)
            return 1
    runtimes = sorted({os.path.basename(p) for p in _mapped_files() if "libasan.so" in p or "libubsan.so" in p})
    if not any("asan" in r for r in runtimes) or not any("ubsan" in r for r in runtimes):
        print(f"sanitizers: the ASan and UBSan runtimes are not both mapped (found {runtimes})", flush=True)
        return 1
    print(f"sanitizers: testing the instrumented {[os.path.basename(p) for p in ours]} (CPU kernels "
          f"{fused_wloss.cpu_isa()}, all of {_extension.available_cpu_isas()} tested) with {runtimes}", flush=True)

    import pytest

    # --capture=sys: pytest's default captures file descriptor 2, where the sanitizer runtimes write
    # their reports; a report would die with the process unseen.
    return pytest.main(["--capture=sys", *argv], plugins=[StrayModuleCheck(package_dir)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
