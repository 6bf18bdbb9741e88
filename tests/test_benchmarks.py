"""Smoke tests of the benchmark driver (benchmarks/run.py): one small case end to end, the
correctness guard, and the refusal of --device cuda without a GPU. A few seconds in all; the
benchmarks themselves are not run by the test suite."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the checkout on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402
from benchmarks.cases import Case  # noqa: E402

TINY = ["--case", "ce-512x100-static-f32", "--no-compile", "--min-time", "0.005"]


def test_driver_writes_results_and_plots(tmp_path, capsys):
    stem = tmp_path / "smoke"
    assert run.main(TINY + ["--out", str(stem)]) == 0
    printed = capsys.readouterr().out
    assert "forward+backward" in printed and "backward only" in printed and "memory, MB" in printed

    data = json.loads(stem.with_suffix(".json").read_text())
    machine = data["machine"]
    for key in ("cpu", "cores", "torch", "date", "fused_wloss_backend"):
        assert machine[key], key
    assert machine["torch"] == torch.__version__
    (row,) = data["rows"]
    assert row["case"] == "ce-512x100-static-f32" and "error" not in row
    impls = {"floor", "fused_wloss", "reference", "torch", "recipe"}
    assert set(row["timings"]) == impls
    if sys.platform.startswith("linux"):  # the share of the CPUs other processes used meanwhile
        assert 0 <= row["other_load"] <= 1
    for name, modes in row["timings"].items():
        assert set(modes) == {"fwd", "bwd", "fwd+bwd"}, name
        for m in modes.values():
            assert 0 < m["q1_ms"] <= m["median_ms"] <= m["q3_ms"] and m["reps"] >= 5
            assert m["gb_per_s"] > 0 and m["pct_floor_bandwidth"] > 0
    # memory: torch keeps its N x C log-softmax for the backward, fused_wloss O(N) statistics
    logits = 512 * 100 * 4
    mem = row["memory"]
    assert mem["torch"]["fwd+bwd"]["saved_bytes"] >= logits
    assert mem["fused_wloss"]["fwd+bwd"]["saved_bytes"] < logits / 2
    for name in impls - {"floor"}:  # the gradient itself is part of every peak
        assert mem[name]["fwd+bwd"]["peak_bytes"] >= logits, name
    if machine["fused_wloss_backend"] == "extension":
        assert any(op.startswith("fused_wloss::cross_entropy") for op in row["fused_ops"])

    with open(stem.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(impls) * 3
    assert {r["impl"] for r in table} == impls
    assert all(r["torch"] == torch.__version__ and r["device_name"] and float(r["median_ms"]) > 0 for r in table)

    for suffix in ("-time.png", "-floor.png"):
        png = Path(f"{stem}{suffix}")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_guard_refuses_to_time_a_wrong_answer(tmp_path, monkeypatch):
    real = run.implementations

    def with_wrong_fused(*args, **kwargs):
        impls = real(*args, **kwargs)
        right = impls["fused_wloss"].fn
        impls["fused_wloss"].fn = lambda x, y, w, s: right(x, y, w, s) * 1.01
        return impls

    monkeypatch.setattr(run, "implementations", with_wrong_fused)
    stem = tmp_path / "wrong"
    assert run.main(TINY + ["--no-plots", "--out", str(stem)]) == 1
    (row,) = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert "disagrees with the reference" in row["error"]
    assert "timings" not in row


def test_guard_drops_a_baseline_that_computes_something_else(tmp_path, monkeypatch):
    real = run.implementations

    def with_wrong_torch(*args, **kwargs):
        impls = real(*args, **kwargs)
        impls["torch"].fn = lambda x, y, w, s: torch.nn.functional.cross_entropy(x, y)  # unweighted
        return impls

    monkeypatch.setattr(run, "implementations", with_wrong_torch)
    stem = tmp_path / "baseline"
    assert run.main(TINY + ["--no-plots", "--no-memory", "--out", str(stem)]) == 0
    (row,) = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert "torch" not in row["timings"] and "disagrees" in row["skipped"]["torch"]
    assert "fused_wloss" in row["timings"]


def test_a_baseline_that_fails_while_timed_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    real = run.implementations

    def with_flaky_recipe(*args, **kwargs):
        impls = real(*args, **kwargs)
        right, calls = impls["recipe"].fn, []

        def flaky(*a):
            calls.append(1)
            if len(calls) > 1:  # right for the correctness check, then out of memory, say
                raise MemoryError("pretend")
            return right(*a)
        impls["recipe"].fn = flaky
        return impls

    monkeypatch.setattr(run, "implementations", with_flaky_recipe)
    stem = tmp_path / "flaky"
    assert run.main(TINY + ["--no-plots", "--out", str(stem)]) == 0
    (row,) = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert "recipe" not in row["timings"] and "MemoryError" in row["skipped"]["recipe"]
    assert "recipe" not in row["memory"] and set(row["timings"]["torch"]) == {"fwd", "bwd", "fwd+bwd"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_case_selection():
    args = run.parse_args(["--dtype", "bfloat16", "--filter", "ce-8192x1000"])
    cases = run.select_cases(args)
    assert cases and all(c.dtype == "bfloat16" and "ce-8192x1000" in c.name for c in cases)
    assert Case("ce", (8192, 1000), "static", "bfloat16") in cases
    for case in cases:
        assert Case.parse(case.name) == case
    assert Case.parse("bce-64x3-sample") == Case("bce", (64, 3), "sample", "float32")
    with pytest.raises(ValueError, match="weighting"):
        Case.parse("ce-64x3-balanced-f32")
    with pytest.raises(SystemExit):
        run.parse_args(["--case", "ce-64xthree-static"])


def test_linear_section_end_to_end(tmp_path, capsys):
    """python -m benchmarks --linear on a tiny head: every implementation checked and timed, peak
    memory from the fresh-process measurement (Linux), the JSON written."""
    stem = tmp_path / "linear"
    argv = ["--linear", "--case", "lce-256x16x300-dynamic-f32", "--min-time", "0.005", "--out", str(stem)]
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fused linear + cross-entropy" in printed and "lce-256x16x300-dynamic-f32" in printed
    data = json.loads(stem.with_suffix(".json").read_text())
    (row,) = data["rows"]
    assert row["case"] == "lce-256x16x300-dynamic-f32" and not row["errors"], row["errors"]
    assert "fused_wloss" in row["impls"] and "torch" in row["impls"]
    for name, m in row["impls"].items():
        assert m["fwd+bwd"]["median_ms"] > 0 and m["fwd+bwd"]["reps"] >= 3, name
        if sys.platform.startswith("linux"):
            assert m["peak_bytes"] >= 0, name
    with pytest.raises(SystemExit):
        run.parse_args(["--linear", "--case", "ce-512x100-static-f32"])


def test_focal_cases_agree_and_run(tmp_path):
    """The focal cases: fused_wloss's focal losses against the torch code that computes them
    (torchvision's sigmoid focal loss for BCE, the usual log-softmax code for cross-entropy), each
    checked against the reference by the driver's guard before it is timed."""
    stem = tmp_path / "focal"
    argv = ["--case", "bce-256x20-focal-f32", "--case", "ce-256x20-focal-f32", "--no-compile", "--no-memory",
            "--no-plots", "--min-time", "0.005", "--out", str(stem)]
    assert run.main(argv) == 0
    rows = {r["case"]: r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"bce-256x20-focal-f32", "ce-256x20-focal-f32"}
    for row in rows.values():
        assert "error" not in row, row.get("error")
    assert set(rows["bce-256x20-focal-f32"]["timings"]) == {"floor", "fused_wloss", "reference", "torch"}
    assert set(rows["ce-256x20-focal-f32"]["timings"]) == {"floor", "fused_wloss", "reference", "recipe"}


def test_cuda_model_predicts_every_lane_shape(capsys):
    """benchmarks/cuda_model.py (a prediction for the GPU lane, not a measurement) runs and gives
    every lane shape a fraction of the floor in (0, 1], dynamic weights no more than static ones."""
    from benchmarks import cuda_model

    assert cuda_model.main() == 0
    assert "not a measurement" in capsys.readouterr().out
    for loss, shape in cuda_model.LANE_SHAPES:
        for elem in (4, 2):
            seconds, fraction = cuda_model.predict(loss, shape, elem, "static")
            assert seconds > 0 and 0 < fraction <= 1.0, (loss, shape, elem, fraction)
            assert cuda_model.predict(loss, shape, elem, "dynamic")[1] <= fraction
