"""The sanitizer lane: the compiled modules rebuilt with AddressSanitizer and UndefinedBehaviorSanitizer,
and the kernel, bad-input, fuzz and thread tests run against that build.

    python tests/sanitizers/run.py [--build-dir DIR] [--examples N] [-- pytest arguments]

(``make sanitize`` runs it with the venv's Python; ``make test`` runs it after the suite.) Steps:

1. In a child process with the ASan runtime preloaded (``LD_PRELOAD``: Python is not instrumented,
   and the runtime must come first), ``bootstrap.py`` builds every module of
   ``fused_wloss._build.extension_specs(with_emu=True)`` a second time through the JIT loader
   (``FUSED_WLOSS_JIT=1``) into ``--build-dir`` (default ``build/sanitizers``), with
   ``-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all`` added through
   ``FUSED_WLOSS_EXTRA_CFLAGS`` / ``FUSED_WLOSS_EXTRA_LDFLAGS`` (the CUDA build is off:
   ``FUSED_WLOSS_NO_CUDA=1``). Rebuilds are incremental (ninja).
2. It checks that every fused_wloss module mapped into the process is the instrumented copy from
   the build directory and that both sanitizer runtimes are mapped, runs pytest on ``TEST_FILES``,
   and checks the mapped modules again at the end: the tests cannot silently run against the
   regular build.
3. Any sanitizer report fails the run: ASan and UBSan stop the process at the first one
   (``halt_on_error``, exit status 86), and a report header anywhere in the output fails the run
   even if the process went on. pytest runs with ``--capture=sys``: its default captures file
   descriptor 2, where the runtimes write, and a report would die with the process unseen (GCC's
   UBSan runtime, loaded with the module, ignores ``log_path``).

Leaks: ``detect_leaks=0``. CPython and torch keep allocations alive until exit by design, and a
leak suppression broad enough to silence them (any frame in libtorch or libpython) would also hide
a leak in our operators, which are always called through both. Leaks are measured instead by the
resident-memory test in tests/test_reliability.py, which runs in the ordinary lane.

The 2^31-element test and other multi-gigabyte cases are skipped here (``FUSED_WLOSS_SKIP_BIG=1``;
ASan's shadow memory and redzones would need about twice the memory), and hypothesis runs fewer
examples per property (``--examples``, default 40; still derandomized).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# The tests that run against the sanitized build. Every module of
# fused_wloss._build.extension_specs(with_emu=True) is built instrumented (bootstrap.py), so a test
# file for another compiled module is one more line here.
TEST_FILES = [
    "tests/test_kernels.py",
    "tests/test_errors.py",
    "tests/test_hostile.py",
    "tests/test_properties.py",
    "tests/test_reliability.py::test_concurrent_threads_match_serial_bitwise",
    "tests/test_cuda_emulation.py",  # the CUDA kernels' source under the emulation layer (fused_wloss._cuda_emu)
    "tests/test_cuda_kernels.py",
    "tests/test_focal.py",  # focal loss through the CPU kernels and the emulated CUDA kernels
]

SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]

ASAN_OPTIONS = {
    "detect_leaks": "0",  # see the module docstring
    "halt_on_error": "1",
    "abort_on_error": "0",
    "exitcode": "86",  # a run that a sanitizer stopped is told apart from failing tests
    "allocator_may_return_null": "1",  # an impossible allocation is torch's RuntimeError, not an abort
    "detect_stack_use_after_return": "1",
    "check_initialization_order": "1",
    "strict_init_order": "1",
    "protect_shadow_gap": "0",  # the CUDA runtime that torch links maps memory there
}
UBSAN_OPTIONS = {"halt_on_error": "1", "print_stacktrace": "1", "report_error_type": "1", "exitcode": "86"}

# Headers of a sanitizer report.
REPORT = re.compile(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error: |SUMMARY: (Address|UndefinedBehavior)Sanitizer")


def _options(d: dict) -> str:
    return ":".join(f"{k}={v}" for k, v in d.items())


def _runtime_library(compiler: str, name: str) -> str:
    path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"sanitizers: {compiler} has no {name}; got {path!r}")
    return os.path.realpath(path)


def preload(compiler: str) -> str:
    """LD_PRELOAD for the test process: the ASan runtime, which must come first, then libstdc++.
    Python does not link libstdc++, so without it ASan finds no real __cxa_throw when it starts
    and the first C++ exception thrown through its interceptor (pybind11's, in a module torch
    imports) stops the process with a CHECK failure."""
    return " ".join(_runtime_library(compiler, n) for n in ("libasan.so", "libstdc++.so"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", default=os.path.join(ROOT, "build", "sanitizers"))
    parser.add_argument("--examples", type=int, default=40, help="hypothesis examples per property")
    parser.add_argument("--seed", type=int, default=None,
                        help="hypothesis seed of the fresh examples (default: a new one each run, printed)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help="passed to pytest instead of the default test files")
    args = parser.parse_args(argv)
    os.makedirs(args.build_dir, exist_ok=True)

    env = dict(os.environ)
    if "CUDA_HOME" not in env and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    env.update({
        "FUSED_WLOSS_JIT": "1",
        "FUSED_WLOSS_NO_CUDA": "1",  # the host code is what runs here; nvcc's output is not instrumented
        "FUSED_WLOSS_BUILD_DIR": os.path.realpath(args.build_dir),
        "FUSED_WLOSS_EXTRA_CFLAGS": " ".join(SANITIZE_FLAGS),
        "FUSED_WLOSS_EXTRA_LDFLAGS": " ".join(SANITIZE_FLAGS[:1]),
        "FUSED_WLOSS_SKIP_BIG": "1",
        "FUSED_WLOSS_REQUIRE_EMU": "1",  # as make test: the emulated CUDA kernels must be there
        "FUSED_WLOSS_HYPOTHESIS_EXAMPLES": str(args.examples),
        # fresh examples every run (tests/fuzzing.py), from the seed printed below
        "FUSED_WLOSS_HYPOTHESIS_FRESH": "1",
        # released gradient blocks go back to malloc at once, so that ASan sees a use after release
        "FUSED_WLOSS_CPU_CACHE_MB": "0",
        "LD_PRELOAD": preload(env.get("CXX", "c++")),
        "ASAN_OPTIONS": _options(ASAN_OPTIONS),
        "UBSAN_OPTIONS": _options(UBSAN_OPTIONS),
        "PYTHONFAULTHANDLER": "1",
    })
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    tests = args.pytest_args or ["-q", "-p", "no:cacheprovider", *TEST_FILES]
    command = [sys.executable, os.path.join(HERE, "bootstrap.py"), f"--hypothesis-seed={seed}", *tests]
    print(f"sanitizers: build dir {args.build_dir}; ASAN_OPTIONS={env['ASAN_OPTIONS']}", flush=True)
    print(f"sanitizers: hypothesis draws fresh examples from seed {seed}; replay a failure with "
          f"`python tests/sanitizers/run.py --seed {seed}` (or FUSED_WLOSS_HYPOTHESIS_FRESH=1 pytest "
          f"--hypothesis-seed={seed} ...)", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    reports = 0
    for line in proc.stdout:
        sys.stdout.write(line)
        if REPORT.search(line):
            reports += 1
    rc = proc.wait()
    elapsed = time.monotonic() - start
    if reports:
        print(f"sanitizers: FAILED, {reports} sanitizer report line(s) in the output (exit status {rc})")
        return rc or 1
    if rc == 86:
        print("sanitizers: FAILED, a sanitizer stopped the run")
    print(f"sanitizers: {'passed' if rc == 0 else 'FAILED'} in {elapsed:.0f} s (exit status {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
