"""Write or merge one phase of the CUDA lane into its summary.json (see .ci/cuda_lane).

    python .ci/lane_summary.py --summary DIR/summary.json --phase test --status pass \
        --seconds 123 [--log tests.log] [--build-seconds 40] [--note "..."]

The summary holds the GPU's name, the torch version, ``sources_sha256`` (the CUDA kernels' sources
and the headers and registrations they share, so anyone can tell whether a proof is for the
current kernels) and ``phases`` ({"test": "pass"|"fail", "check": ...}), plus per-phase details:
seconds, the build's seconds, the pytest counts read from the log's closing line, notes. A phase
merges into the file another phase wrote before it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The definition, verbatim: every file under csrc but the CPU kernels and the emulator.
SOURCES_CMD = ("find csrc -type f -not -path 'csrc/cpu/*' -not -path 'csrc/emu/*' | LC_ALL=C sort "
               "| xargs cat | sha256sum | cut -d' ' -f1")


def sources_sha256() -> str:
    out = subprocess.run(["bash", "-c", SOURCES_CMD], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def pytest_counts(log_path: str) -> dict:
    """The counts of pytest's closing line ("3 failed, 1124 passed, 14 skipped in 61.78s")."""
    counts = {}
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return counts
    for line in reversed(lines):
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|error|errors|xfailed|xpassed)", line)
        if found and (" in " in line or line.startswith("=")):
            for n, what in found:
                counts["errors" if what == "error" else what] = int(n)
            break
    return counts


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        name = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.TimeoutExpired, IndexError):
        name = ""
    return name or "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--summary", required=True)
    p.add_argument("--phase", required=True, choices=["test", "check"])
    p.add_argument("--status", required=True, choices=["pass", "fail"])
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--log", action="append", default=[], help="a pytest log whose counts to record (repeatable)")
    p.add_argument("--build-seconds", type=float)
    p.add_argument("--gpu", help="the GPU's name (default: nvidia-smi's)")
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)

    summary = {}
    if os.path.exists(args.summary):
        with open(args.summary) as f:
            summary = json.load(f)
    import torch

    sha = sources_sha256()
    if summary.get("sources_sha256") not in (None, sha):
        # an earlier phase ran on other sources: its result does not prove these
        summary["phases"] = {}
        summary["details"] = {}
        args.note.append("an earlier phase of this summary ran on other sources and was dropped")
    summary["gpu"] = args.gpu or gpu_name()
    summary["torch"] = torch.__version__
    summary["sources_sha256"] = sha
    summary.setdefault("phases", {})[args.phase] = args.status
    detail = {"seconds": round(args.seconds, 1)}
    if args.build_seconds is not None:
        detail["build_seconds"] = round(args.build_seconds, 1)
    for log in args.log:
        detail.setdefault("tests", {})[os.path.basename(log)] = pytest_counts(log)
    if args.note:
        detail["notes"] = args.note
    summary.setdefault("details", {})[args.phase] = detail
    os.makedirs(os.path.dirname(os.path.abspath(args.summary)), exist_ok=True)
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
