"""The CUDA lane's scripts (.ci/cuda_lane, .ci/lane_summary.py), rehearsed here so they cannot rot
before a GPU comes: a small dry run of both phases on the emulated kernels, the GPU selection's
size, and the summary's keys and merging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import fused_wloss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANE = os.path.join(ROOT, ".ci", "cuda_lane")

pytestmark = pytest.mark.skipif(fused_wloss.backend("cpu") != "extension", reason="compiled CPU kernels not loaded")


def _lane(phase, dest, **env):
    full = {k: v for k, v in os.environ.items() if k != "OUT"}  # OUT only where a test sets it
    full.update(FUSED_WLOSS_LANE="emu", FUSED_WLOSS_LANE_DEST=str(dest), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", LANE, phase], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


def _sources_sha256():
    cmd = ("find csrc -type f -not -path 'csrc/cpu/*' -not -path 'csrc/emu/*' | LC_ALL=C sort | xargs cat "
           "| sha256sum | cut -d' ' -f1")
    return subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_dry_run_of_both_phases_writes_one_summary(tmp_path):
    out = tmp_path / "out"
    test = _lane("test", tmp_path, FUSED_WLOSS_LANE_K="bce_blocks_and_dtypes and float32", OUT=str(out))
    assert test.returncode == 0, test.stdout + test.stderr
    with open(tmp_path / "summary.json") as f:
        first = json.load(f)
    assert first["phases"] == {"test": "pass"}
    counts = first["details"]["test"]["tests"]["tests.log"]
    assert counts.get("passed", 0) > 0 and counts.get("failed", 0) == 0, counts
    assert sorted(os.listdir(out)) == ["build.log", "machine.txt", "summary.json", "tests.log"]

    check = _lane("check", tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert {"gpu", "torch", "sources_sha256", "phases"} <= set(summary)
    assert summary["phases"] == {"test": "pass", "check": "pass"}
    assert summary["gpu"] == "emulated"
    assert summary["sources_sha256"] == _sources_sha256()


def test_a_failing_phase_says_so(tmp_path):
    """A selection that collects nothing fails the phase, in the exit status and the summary."""
    run = _lane("test", tmp_path, FUSED_WLOSS_LANE_K="no_test_has_this_name")
    assert run.returncode != 0
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["phases"] == {"test": "fail"}


def test_gpu_selection_collects_what_the_lane_expects():
    """-m gpu over the lane's files collects at least the script's MIN_GPU_TESTS items."""
    with open(LANE) as f:
        script = f.read()
    minimum = int(re.search(r"^MIN_GPU_TESTS=(\d+)", script, re.M).group(1))
    files = re.search(r"^FILES=\(([^)]*)\)", script, re.M).group(1).split()
    run = subprocess.run([sys.executable, "-m", "pytest", *files, "-m", "gpu", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    collected = sum("::" in line for line in run.stdout.splitlines())
    assert collected >= minimum, run.stdout[-2000:]
    # and only GPU variants: no emulator or CPU parametrisation among them
    assert not any(re.search(r"\[(emu|cpu-)", line) for line in run.stdout.splitlines())


def test_summary_of_other_sources_is_not_merged(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"gpu": "x", "torch": "y", "sources_sha256": "0" * 64, "phases": {"test": "pass"}}))
    subprocess.run([sys.executable, os.path.join(ROOT, ".ci", "lane_summary.py"), "--summary", str(path),
                    "--phase", "check", "--status", "pass", "--seconds", "1", "--gpu", "emulated"],
                   cwd=ROOT, check=True, capture_output=True)
    summary = json.loads(path.read_text())
    assert summary["phases"] == {"check": "pass"}  # the test phase ran on other sources
    assert summary["sources_sha256"] == _sources_sha256()
