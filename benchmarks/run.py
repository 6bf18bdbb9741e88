"""The benchmark driver: ``python -m benchmarks [--quick|--full] [--device cpu|cuda] ...``.

For every case it first checks that fused_wloss agrees with the reference (no speed is reported for
a wrong answer), then times each implementation's forward and forward+backward in this process,
next to the memory-traffic floor measured in the same run, and writes a table to stdout and
JSON/CSV under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fused_wloss

from .cases import FULL_CASES, QUICK_CASES, Case, implementations

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, min_time=0.25, min_reps=5, max_reps=200):
    """Median and interquartile range of ``fn()`` in milliseconds, after two warm-up calls."""
    for _ in range(2):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "reps": len(times)}


def check_case(case, impls, x, y, w, dtype):
    """fused_wloss vs the reference on this very input, value and gradient."""
    out = {}
    for name in ("fused_wloss", "reference"):
        xx = x.detach().clone().requires_grad_()
        val = impls[name](xx, y, w)
        (g,) = torch.autograd.grad(val, xx)
        out[name] = (val.detach().double(), g.double())
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    for a, b in zip(out["fused_wloss"], out["reference"]):
        if not torch.allclose(a, b, rtol=tol, atol=tol * 1e-2):
            return f"max abs diff {float((a - b).abs().max()):.3g}"
    return None


def run_case(case: Case, device, dtype, with_compile: bool):
    if with_compile:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit across shapes
    x, y, w = case.make_inputs(device, dtype)
    impls = implementations(case, with_compile)
    problem = check_case(case, impls, x, y, w, dtype)
    row = {"case": case.name, "loss": case.loss, "shape": list(case.shape), "weighting": case.weighting,
           "dtype": str(dtype).replace("torch.", ""), "logits_mb": x.numel() * x.element_size() / 2**20,
           "backend": fused_wloss.backend(device), "timings": {}}
    if problem:
        row["error"] = f"fused_wloss disagrees with the reference: {problem}; not timed"
        return row
    xg = x.detach().clone().requires_grad_()

    def fwd_bwd(fn):
        def go():
            (g,) = torch.autograd.grad(fn(xg, y, w), xg)
            return g
        return go

    def fwd(fn):
        def go():
            with torch.no_grad():
                return fn(x, y, w)
        return go

    # the floor: one full read (x.sum()) and, for forward+backward, one fresh N x C tensor
    row["timings"]["floor"] = {"fwd": measure(lambda: x.sum(), device),
                               "fwd+bwd": measure(lambda: (x.sum(), x.clone()), device)}
    for name, fn in impls.items():
        try:
            row["timings"][name] = {"fwd": measure(fwd(fn), device), "fwd+bwd": measure(fwd_bwd(fn), device)}
        except Exception as e:  # a baseline that fails (e.g. a compile error) is reported, not fatal
            row.setdefault("baseline_errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def machine_info(device):
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(rows, mode):
    impls = []
    for row in rows:
        impls += [k for k in row["timings"] if k != "floor" and k not in impls]
    head = (f"{'case':32} {'MB':>7} " + " ".join(f"{n:>14}" for n in impls)
            + f" {'floor':>9}  ratios: their time / ours (> 1: fused_wloss is faster)")
    lines = [f"== {mode} (median ms) ==", head]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['case']:32} {row['error']}")
            continue
        t = {k: v[mode]["median_ms"] for k, v in row["timings"].items()}
        ours = t["fused_wloss"]
        cells = " ".join(f"{t[n]:14.3f}" if n in t else f"{'-':>14}" for n in impls)
        ratios = [f"{n} {t[n] / ours:.2f}x" for n in impls if n != "fused_wloss" and n in t]
        ratios.append(f"ours/floor {ours / t['floor']:.2f}")
        lines.append(f"{row['case']:32} {row['logits_mb']:7.1f} {cells} {t['floor']:9.3f}  " + ", ".join(ratios))
        for name, err in row.get("baseline_errors", {}).items():
            lines.append(f"{'':32} {name} failed: {err}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the small set `make bench` runs (default)")
    size.add_argument("--full", action="store_true", help="every shape of the kernel issues")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--filter", default="", help="only cases whose name contains this text")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default=None, help="results file stem (default: results/<device>-<date>)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cases = [c for c in (FULL_CASES if args.full else QUICK_CASES) if args.filter in c.name]
    info = machine_info(device)
    print(f"fused_wloss {fused_wloss.__version__} backend={fused_wloss.backend(device)} | torch {info['torch']} | "
          f"{info.get('gpu', info['cpu'])} ({info['cores']} cores, {info['threads']} threads, {info['cpu_capability']}) | {args.dtype}",
          flush=True)
    rows = []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(cases)}] {case.name} ...", end="", flush=True, file=sys.stderr)
        rows.append(run_case(case, device, dtype, with_compile=not args.no_compile))
        print(f" {time.perf_counter() - t0:.1f}s", flush=True, file=sys.stderr)
    for mode in ("fwd+bwd", "fwd"):
        print()
        print(format_table(rows, mode))

    RESULTS.mkdir(exist_ok=True)
    stem = args.out or f"{args.device}-{args.dtype}-{'full' if args.full else 'quick'}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["case", "dtype", "logits_mb", "impl", "mode", "median_ms", "q1_ms", "q3_ms", "reps"])
        for row in rows:
            for impl, modes in row["timings"].items():
                for mode, m in modes.items():
                    wr.writerow([row["case"], row["dtype"], f"{row['logits_mb']:.2f}", impl, mode,
                                 f"{m['median_ms']:.4f}", f"{m['q1_ms']:.4f}", f"{m['q3_ms']:.4f}", m["reps"]])
    print(f"\nresults: {RESULTS / stem}.json, .csv")
    return 1 if any("error" in r for r in rows) else 0
