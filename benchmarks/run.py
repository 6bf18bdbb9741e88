"""The benchmark driver: ``python -m benchmarks [--quick|--full] [--device cpu|cuda] [--dtype ...] ...``.

``--linear`` runs the fused linear + cross-entropy section instead (benchmarks/linear.py).

For every case it first checks that fused_wloss agrees with its reference on that very input (no
speed is reported for a wrong answer) and that every baseline computes the same loss; then it times
forward, backward and forward+backward of each implementation next to the memory-traffic floor
measured in the same process, measures peak memory and the bytes saved for backward, prints tables
of ratios, and writes JSON, CSV and PNG plots under benchmarks/results/. benchmarks/measure.py
says how each number is measured.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

import fused_wloss

from . import measure, report
from .cases import Case, case_set, implementations, liger_cross_entropy
from .measure import MODES, TRAFFIC, Timed, Timer

RESULTS = Path(__file__).resolve().parent / "results"

# repeats per timing: seconds of calls per implementation and mode, at least and at most so many
# calls, after so many untimed warm-up calls (the correctness check has already run each one once)
EFFORT = {"quick": dict(min_time=0.15, min_reps=5, max_reps=100, warmup=1),
          "full": dict(min_time=0.5, min_reps=10, max_reps=400, warmup=2)}


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device.type,
        "torch": torch.__version__,
        "fused_wloss": fused_wloss.__version__,
        "fused_wloss_backend": fused_wloss.backend(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_start": _load(),
    }
    try:
        info["cpu_isa"] = fused_wloss.cpu_isa()
    except Exception:  # no compiled CPU module
        info["cpu_isa"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# -- one case ----------------------------------------------------------------------------------------

def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


def _release(device) -> None:
    """After a failure (say, CUDA out of memory), give cached blocks back before going on."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def floor_calls(case: Case, inputs, device):
    """The memory-traffic floor per mode: read the logits (and dense targets: BCE's, probabilities)
    once for the forward; read them and write one N x C tensor for the backward. On the CPU that tensor is fresh
    (x.clone(), as a real gradient, pays its page faults); on CUDA it is a copy into an existing
    buffer (the caching allocator hands out memory already mapped)."""
    x, y = inputs.x, inputs.y
    if device.type == "cuda":
        buf = torch.empty_like(x)
        write = lambda: buf.copy_(x)  # noqa: E731
    else:
        write = x.clone
    dense = case.loss == "bce" or case.weighting == "soft"  # targets as large as the logits, read in both passes
    if dense:
        read = lambda: (x.sum(), y.sum())  # noqa: E731
        traffic = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
    else:
        read = x.sum
        traffic = TRAFFIC
    calls = {"fwd": read, "bwd": lambda: (y.sum(), write()) if dense else write(),
             "fwd+bwd": lambda: (read(), write())}
    return calls, traffic


def timed_calls(impl, inputs, shared, mode):
    """The timed call of ``impl`` in ``mode``. ``shared`` is a leaf copy of the logits that every
    non-destructive call differentiates (autograd.grad does not accumulate into it)."""
    fn, y, w, s = impl.fn, inputs.y, inputs.w, inputs.s
    x = inputs.x.detach()

    def leaf():
        return x.clone().requires_grad_() if impl.destructive else shared

    if mode == "fwd":
        def fwd(xx):
            with torch.no_grad():
                return fn(x if xx is None else xx, y, w, s)
        return Timed(impl.name, fwd, (lambda: x.clone()) if impl.destructive else None)
    if mode == "fwd+bwd":
        def fwd_bwd(xx):
            (g,) = torch.autograd.grad(fn(xx, y, w, s), xx)
            return g
        return Timed(impl.name, fwd_bwd, leaf)

    def forward():
        xx = leaf()
        return xx, fn(xx, y, w, s)

    def bwd(state):
        xx, loss = state
        (g,) = torch.autograd.grad(loss, xx)
        return g
    return Timed(impl.name, bwd, forward)


def run_case(case: Case, device, compile_mode: str, liger, timer: Timer, with_memory: bool, progress):
    if compile_mode != "none":
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit across shapes
    inputs = case.make_inputs(device)
    row = {"case": case.name, "loss": case.loss, "shape": list(case.shape), "weighting": case.weighting,
           "dtype": case.dtype, "amp": case.amp, "num_classes": case.num_classes, "logits_mb": case.logits_bytes / 2**20,
           "backend": fused_wloss.backend(device)}
    impls = implementations(case, device, compile_mode, liger)

    clock = time.perf_counter()
    row["seconds"] = {}

    def lap(what):
        nonlocal clock
        now = time.perf_counter()
        row["seconds"][what] = round(now - clock, 2)
        clock = now

    # the guard: fused_wloss against the reference; every baseline must compute the same loss
    tol = measure.tolerance(case.torch_dtype)
    try:
        want = measure.value_and_grad(impls["reference"].fn, inputs)
        problem = measure.disagreement(measure.value_and_grad(impls["fused_wloss"].fn, inputs), want, tol)
    except Exception as e:  # an exception in fused_wloss or its reference is as bad as a wrong answer
        problem = f"raised {_first_line(e)}"
        _release(device)
    if problem:
        row["error"] = f"fused_wloss disagrees with the reference ({problem}): not timed"
        progress.update(5)
        return row
    skipped = {}
    for name, impl in list(impls.items()):
        if name in ("fused_wloss", "reference"):
            continue
        try:
            got = measure.value_and_grad(impl.fn, inputs)
        except Exception as e:  # a baseline that cannot run (a compile error, a missing feature)
            skipped[name] = f"failed: {_first_line(e)}"
            _release(device)
        else:
            # torch's own half-precision code rounds its intermediates: give it 4x the room
            bad = measure.disagreement(got, want, tol if case.dtype in ("float32", "float64") else 4 * tol)
            if bad:
                skipped[name] = f"disagrees with the reference: {bad}"
        if name in skipped:
            del impls[name]
    lap("check+compile")
    progress.update(1)

    floors, traffic = floor_calls(case, inputs, device)
    shared = inputs.x.detach().clone().requires_grad_()
    row["timings"] = {}
    other_load = measure.OtherLoad()
    other_load.start()
    for mode in ("fwd+bwd", "fwd", "bwd"):
        items = [Timed("floor", lambda _, f=floors[mode]: f())]
        items += [timed_calls(impl, inputs, shared, mode) for impl in impls.values()]
        stats, failed = timer.run(items)
        for name, m in stats.items():
            row["timings"].setdefault(name, {})[mode] = m
        for name, err in failed.items():  # e.g. out of memory: reported, and the case goes on
            skipped[name] = f"failed while timed ({mode}): {err}"
            impls.pop(name, None)
            _release(device)
        lap(mode)
        progress.update(1)
    row["other_load"] = other_load.stop()  # share of the CPUs other processes used while this case was timed
    if any(m not in row["timings"].get("floor", {}) for m in MODES) or "fused_wloss" not in impls:
        row["error"] = f"not timed: {skipped.get('fused_wloss') or skipped.get('floor')}"
        row.pop("timings")
        if skipped:
            row["skipped"] = skipped
        progress.update(1)
        return row
    if skipped:
        row["skipped"] = skipped
    del shared
    for name, modes in row["timings"].items():
        for mode, m in modes.items():
            floor = row["timings"]["floor"][mode]["median_ms"]
            m["gb_per_s"] = traffic[mode] * case.logits_bytes / (m["median_ms"] * 1e-3) / 1e9
            m["pct_floor_bandwidth"] = 100.0 * floor / m["median_ms"]
    # an implementation that failed in a later mode is dropped from every mode
    row["timings"] = {k: row["timings"][k] for k in ["floor", *impls]}

    if with_memory:
        row["memory"] = {}
        for name, impl in impls.items():
            try:
                row["memory"][name] = {
                    "fwd+bwd": measure.memory(impl.fn, inputs, device, impl.destructive, backward=True),
                    "fwd": measure.memory(impl.fn, inputs, device, impl.destructive, backward=False),
                }
            except Exception as e:
                row.setdefault("skipped", {})[f"{name} memory"] = f"failed: {_first_line(e)}"
                _release(device)
        ops = row["memory"].get("fused_wloss", {}).get("fwd+bwd", {}).get("fused_ops")
        if ops is not None:
            row["fused_ops"] = ops  # which fused_wloss operators ran: [] means the reference served it
        lap("memory")
    progress.update(1)
    return row


# -- the command line --------------------------------------------------------------------------------

class _Progress:
    """tqdm when installed (shown once a run has taken 2 seconds), else a line per case on stderr."""

    def __init__(self, total: int, cases):
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, delay=2, unit="step", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self._n = len(cases)

    def case(self, i, case):
        if self._bar is not None:
            self._bar.set_description(f"{case.name}")
        else:
            print(f"[{i}/{self._n}] {case.name}", file=sys.stderr, flush=True)

    def update(self, n):
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the small set `make bench` runs (the default)")
    size.add_argument("--full", action="store_true", help="every shape of the kernel issues, every weighting and dtype")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes (float32, bfloat16, float16, float64) replacing the set's own")
    p.add_argument("--case", action="append", default=[], metavar="NAME",
                   help="run this case instead of a set (repeatable): loss-shape-weighting-dtype, "
                   "e.g. ce-4096x32000-dynamic-bf16 or bce-8192x1000-sample-f32")
    p.add_argument("--filter", default="", help="only cases whose name matches this regular expression, "
                   "e.g. 'ce-8192x1000' or 'dynamic-f32'")
    p.add_argument("--compile", default=None, choices=["all", "one", "none"],
                   help="torch.compile baselines: of both torch codes (all; --full's default), of the recipe "
                   "only (one; --quick's default) or none")
    p.add_argument("--no-compile", action="store_true", help="the same as --compile none")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of repeated calls per implementation and mode (default 0.15 quick, 0.5 full)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and fused_wloss (default: torch's, one per core); "
                   "1 gives steadier times on a machine that other jobs share")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory and saved-bytes measurements")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--impl", default="",
                   help="--linear only: a regular expression picking the baselines to run besides fused_wloss, "
                   "e.g. 'chunked' (the large heads of --full take tens of seconds a call)")
    p.add_argument("--linear", action="store_true",
                   help="the fused linear + cross-entropy section (benchmarks/linear.py): heads of (N, H, C) against "
                   "torch's composition, F.linear_cross_entropy (chunked and not) and Liger; --quick/--full, "
                   "--device, --filter, --threads, --no-memory and --out apply")
    p.add_argument("--out", default=None,
                   help="results stem: a name under benchmarks/results/ or a path "
                   "(default <device>-quick or <device>-full, with -filtered for a --filter/--dtype run)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: torch sees no CUDA GPU here (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}, torch.cuda.is_available() is False). "
                "Run it on a machine with an NVIDIA GPU, or use --device cpu.")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a positive number of threads, got {args.threads}")
    if args.dtype:
        bad = [d for d in args.dtype.split(",") if d not in ("float32", "bfloat16", "float16", "float64")]
        if bad:
            p.error(f"--dtype: expected float32, bfloat16, float16 or float64 (comma-separated), got {bad}")
    for name in args.case:
        try:
            if args.linear:
                from .linear import parse as parse_linear

                parse_linear(name)
            else:
                Case.parse(name)
        except ValueError as e:
            p.error(f"--case: {e}")
    try:
        re.compile(args.filter)
    except re.error as e:
        p.error(f"--filter: not a regular expression ({e}): {args.filter!r}")
    return args


def select_cases(args):
    cases = [Case.parse(n) for n in args.case] if args.case else case_set(args.device, args.full)
    if args.dtype:
        seen, picked = set(), []
        for dt in args.dtype.split(","):
            for c in cases:
                amp = c.amp and dt in ("float16", "bfloat16")  # autocast cases keep their half dtype
                key = (c.loss, c.shape, c.weighting, dt, amp)
                if key not in seen:
                    seen.add(key)
                    picked.append(Case(c.loss, c.shape, c.weighting, dt, amp))
        cases = picked
    return [c for c in cases if re.search(args.filter, c.name)]


def main(argv=None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(parse_args(argv), argv)
    finally:
        torch.set_num_threads(threads)  # --threads does not outlive the run (in-process callers)


def _main(args, argv) -> int:
    # torch.compile imports cpp_extension, which warns that this machine has no CUDA runtime
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    effort = "full" if args.full else "quick"
    compile_mode = "none" if args.no_compile else (args.compile or ("all" if args.full else "one"))
    effort_settings = dict(EFFORT[effort])
    if args.min_time is not None:
        effort_settings["min_time"] = args.min_time
    if args.linear:
        return _main_linear(args, argv, device, effort)
    cases = select_cases(args)
    if not cases:
        print(f"no case matches --filter {args.filter!r}", file=sys.stderr)
        return 2

    info = machine_info(device)
    liger = None
    if device.type == "cuda":
        liger, liger_note = liger_cross_entropy()
        info["liger"] = liger_note
        print(f"note: {liger_note}", flush=True)
    print(f"fused_wloss {info['fused_wloss']} (backend on {device.type}: {info['fused_wloss_backend']}"
          f"{', cpu isa ' + str(info['cpu_isa']) if device.type == 'cpu' else ''}) | torch {info['torch']} | "
          f"{info.get('gpu') or info['cpu']} | {info['cores']} cores, {info['threads']} threads | "
          f"load {info['load_average_start']} | {len(cases)} cases, compile={compile_mode}", flush=True)

    timer = Timer(device, **effort_settings)
    progress = _Progress(5 * len(cases), cases)
    rows = []
    t0 = time.perf_counter()
    try:
        for i, case in enumerate(cases, 1):
            progress.case(i, case)
            rows.append(run_case(case, device, compile_mode, liger, timer, not args.no_memory, progress))
    finally:
        progress.close()
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["load_average_end"] = _load()

    for mode in ("fwd+bwd", "fwd", "bwd"):
        print()
        print(report.format_table(rows, mode))
    if not args.no_memory:
        print()
        print(report.format_memory(rows))
    notes = report.format_notes(rows)
    if notes:
        print()
        print(notes)

    stem_name = args.out or (f"{device.type}" + (f"-{_slug(info['gpu'])}" if "gpu" in info else "")
                             + f"-{effort}" + ("-filtered" if args.filter or args.dtype or args.case else ""))
    stem = Path(stem_name)
    if not stem.is_absolute() and stem.parent == Path("."):
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    settings = {"set": effort, "compile": compile_mode, **effort_settings, "filter": args.filter,
                "dtype": args.dtype, "cases": args.case,
                "argv": sys.argv[1:] if argv is None else list(argv)}
    report.write_json(Path(f"{stem}.json"), info, settings, rows)
    report.write_csv(Path(f"{stem}.csv"), info, rows)
    written = [f"{stem}.json", f"{stem}.csv"]
    if not args.no_plots:
        try:
            written += [str(p) for p in report.plot(rows, info, stem)]
        except ImportError as e:
            print(f"note: no plots ({e}); pip install matplotlib", file=sys.stderr)
    print(f"\n{info['seconds']:.0f} s; load average {info['load_average_start']} -> {info['load_average_end']}; "
          f"results: {', '.join(written)}")
    return 1 if any("error" in r for r in rows) else 0


def _main_linear(args, argv, device, effort) -> int:
    """The fused linear + cross-entropy section (benchmarks/linear.py): its own cases and table."""
    import json

    from . import linear

    cases = linear.select(args.full, args.filter, args.case)
    if not cases:
        print(f"no linear case matches --filter {args.filter!r}", file=sys.stderr)
        return 2
    info = machine_info(device)
    print(f"fused_wloss {info['fused_wloss']} | torch {info['torch']} | {info.get('gpu') or info['cpu']} | "
          f"{info['cores']} cores, {info['threads']} threads | load {info['load_average_start']} | "
          f"{len(cases)} linear cases", flush=True)
    # calls of a second or more: a few repeats, each timed on fresh leaves
    timer = Timer(device, min_time=args.min_time or 1.0, min_reps=3, max_reps=20, warmup=1)
    rows = []
    t0 = time.perf_counter()
    for case in cases:
        print(f"  {case.name} ...", flush=True)
        rows.append(linear.run_case(case, device, timer, not args.no_memory, args.impl))
        _release(device)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["load_average_end"] = _load()
    print()
    print(linear.format_rows(rows))
    stem = Path(args.out or f"{device.type}-linear-{effort}")
    if not stem.is_absolute() and stem.parent == Path("."):
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    settings = {"set": effort, "filter": args.filter, "argv": sys.argv[1:] if argv is None else list(argv)}
    Path(f"{stem}.json").write_text(json.dumps({"machine": info, "settings": settings, "rows": rows}, indent=1))
    print(f"\n{info['seconds']:.0f} s; results: {stem}.json")
    return 1 if any(r["errors"] for r in rows) else 0
