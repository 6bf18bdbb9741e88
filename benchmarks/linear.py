"""The fused linear + cross-entropy section: ``python -m benchmarks --linear [--full] [--device cuda]``.

Each case is a classifier head (N rows of H features, C classes) with its loss, forward+backward
with respect to the features and the linear weight, timed for:

- ``fused_wloss``: :func:`fused_wloss.linear_cross_entropy` (the logits one chunk at a time);
- ``torch``: ``F.cross_entropy(F.linear(x, W), y, weight=w)``, the full logits;
- ``torch-lce``: ``F.linear_cross_entropy(..., options=None)`` (torch >= 2.13; the same composition);
- ``torch-lce-chunked``: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``, torch's
  chunked path;
- ``liger``: Liger-Kernel's fused linear cross-entropy (CUDA, when its wheel is installed; static
  weights only).

Dynamic weights are ``class_weighting="inverse"`` for fused_wloss and, for torch, the recipe
``w = 1 / (bincount(y) + 1)`` passed as ``weight``: the same loss. ``-amp`` cases run float32
leaves under ``torch.autocast`` (bfloat16). Before timing, every implementation's loss and
gradients are checked against fused_wloss's unfused composition on the same inputs.

Peak memory is the most memory the call held above its inputs, gradients included: on CUDA from
the caching allocator's statistics; on the CPU from the rise of the resident high-water mark over
one call (every byte touched, inside torch's allocator or not), in a fresh process whose glibc maps
and unmaps every block of 64 KiB or more, so that freed memory leaves the count.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import fused_wloss

from .measure import Timed, Timer, sync

QUICK = [((4096, 256, 32000), "static", "float32", False), ((4096, 256, 32000), "dynamic", "float32", False),
         ((16384, 128, 1000), "static", "float32", False), ((16384, 128, 1000), "dynamic", "float32", False),
         ((4096, 256, 32000), "dynamic", "bfloat16", True)]
FULL_SHAPES = [(4096, 256, 32000), (16384, 128, 1000), (2048, 1024, 128256)]


@dataclass(frozen=True)
class LinearCase:
    shape: tuple  # (N, H, C)
    weighting: str  # static | dynamic
    dtype: str = "float32"
    amp: bool = False  # float32 leaves under autocast(dtype)

    @property
    def name(self) -> str:
        n, h, c = self.shape
        dt = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[self.dtype]
        return f"lce-{n}x{h}x{c}-{self.weighting}-{dt}{'-amp' if self.amp else ''}"


def parse(name: str) -> LinearCase:
    """``lce-NxHxC-{static,dynamic}-{f32,bf16,f16}[-amp]``, as LinearCase.name writes it."""
    m = re.fullmatch(r"lce-(\d+)x(\d+)x(\d+)-(static|dynamic)-(f32|bf16|f16)(-amp)?", name)
    if m is None:
        raise ValueError(f"a linear case is named lce-NxHxC-static|dynamic-f32|bf16|f16[-amp], got {name!r}")
    dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[m.group(5)]
    return LinearCase((int(m.group(1)), int(m.group(2)), int(m.group(3))), m.group(4), dtype, m.group(6) is not None)


def case_set(full: bool) -> List[LinearCase]:
    if not full:
        return [LinearCase(*c) for c in QUICK]
    return [LinearCase(s, w, dt, amp) for s in FULL_SHAPES for w in ("static", "dynamic")
            for dt, amp in (("float32", False), ("bfloat16", True))]


def _inputs(case: LinearCase, device):
    n, h, c = case.shape
    gen = torch.Generator().manual_seed(0)
    leaf_dtype = torch.float32 if case.amp else getattr(torch, case.dtype)
    x = torch.randn(n, h, generator=gen).to(device, leaf_dtype)
    w = (torch.randn(c, h, generator=gen) / h ** 0.5).to(device, leaf_dtype)
    # Zipf-like labels: a few frequent classes and a long tail, as vocabularies and imbalanced data
    ranks = torch.arange(1, c + 1, dtype=torch.float64)
    y = torch.multinomial(1.0 / ranks, n, replacement=True, generator=gen).to(device)
    static = (torch.rand(c, generator=gen) + 0.5).to(device)
    return x, w, y, static


def implementations(case: LinearCase, device, static) -> Dict[str, Callable]:
    dynamic = case.weighting == "dynamic"

    def torch_weight(y):
        return 1.0 / (torch.bincount(y, minlength=static.shape[0]) + 1).float() if dynamic else static

    impls = {
        "fused_wloss": lambda x, w, y: fused_wloss.linear_cross_entropy(
            x, w, y, **({"class_weighting": "inverse"} if dynamic else {"weight": static})),
        "torch": lambda x, w, y: F.cross_entropy(F.linear(x, w), y, weight=torch_weight(y)),
    }
    if hasattr(F, "linear_cross_entropy"):
        impls["torch-lce"] = lambda x, w, y: F.linear_cross_entropy(x, w, y, weight=torch_weight(y))
        options = torch.nn.LinearCrossEntropyOptions()
        impls["torch-lce-chunked"] = lambda x, w, y: F.linear_cross_entropy(
            x, w, y, weight=torch_weight(y), options=options)
    if device.type == "cuda" and not dynamic:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError:
            pass
        else:
            impls["liger"] = lambda x, w, y: liger_fused_linear_cross_entropy(x, w, y, ce_weight=static)
    return impls


def _call(fn, x, w, y, amp: bool, dtype):
    ctx = torch.autocast(x.device.type, dtype=getattr(torch, dtype)) if amp else contextlib.nullcontext()
    with ctx:
        loss = fn(x, w, y)
    gx, gw = torch.autograd.grad(loss, (x, w))
    return loss, gx, gw


def _leaves(x, w):
    return x.detach().requires_grad_(True), w.detach().requires_grad_(True)


def _check(impls, x, w, y, case) -> Dict[str, str]:
    """Each implementation against fused_wloss's unfused composition on these inputs."""
    tol = 2e-2 if case.amp or case.dtype != "float32" else 2e-3
    dynamic = case.weighting == "dynamic"
    static = None if dynamic else impls.get("_static")
    xs, ws = _leaves(x, w)
    ref = _call(lambda a, b, t: fused_wloss.cross_entropy(
        F.linear(a, b), t, **({"class_weighting": "inverse"} if dynamic else {"weight": static})),
        xs, ws, y, case.amp, case.dtype)
    errors = {}
    for name, fn in impls.items():
        if name.startswith("_"):
            continue
        try:
            got = _call(fn, *_leaves(x, w), y, case.amp, case.dtype)
        except Exception as e:  # reported, not timed
            errors[name] = f"{type(e).__name__}: {str(e).strip()[:160]}"
            continue
        for what, a, b in zip(("loss", "grad input", "grad weight"), got, ref):
            scale = b.detach().abs().max().item() or 1.0
            err = (a.detach().float() - b.detach().float()).abs().max().item() / scale
            if not err <= tol:
                errors[name] = f"{what} differs from the composition by {err:.2e} (relative to its max)"
                break
    return errors


def peak_bytes(fn, x, w, y, case) -> int:
    """Most memory held above the inputs during one forward+backward (see the module docstring).
    On the CPU call it in a process whose glibc maps every large block (``_fixed_mmap_threshold``),
    so that the resident size follows the live memory."""
    xs, ws = _leaves(x, w)
    if x.device.type == "cuda":
        sync(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        out = _call(fn, xs, ws, y, case.amp, case.dtype)
        sync(x.device)
        del out
        return torch.cuda.max_memory_allocated(x.device) - base
    return _rss_peak(lambda: _call(fn, xs, ws, y, case.amp, case.dtype))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_peak(call) -> int:
    """CPU: the rise of the process's resident high-water mark (Linux VmHWM, reset through
    /proc/self/clear_refs) over one call, after freed heap memory and fused_wloss's output cache
    went back to the system. Counts every byte the call touched, also outside torch's allocator
    (the profiler sees only torch's allocations). -1 where the kernel offers no such reset."""
    import ctypes
    import gc

    from fused_wloss import _extension

    gc.collect()
    if _extension._C is not None and hasattr(_extension._C, "empty_cpu_cache"):
        _extension._C.empty_cpu_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        return -1
    out = call()
    peak = _status_kb("VmHWM")
    del out
    return (peak - before) * 1024


def _fixed_mmap_threshold() -> None:
    """glibc: serve every block of 64 KiB or more by mmap and give it back on free (the adaptive
    threshold would keep freed blocks resident and count them in the next call's peak)."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def cpu_peaks_in_subprocess(case: "LinearCase", names: List[str], threads: int) -> Dict[str, int]:
    """The CPU peaks of ``names`` for ``case``, measured in a fresh process with a fixed mmap
    threshold (timings stay in the parent, whose allocator is left as it is)."""
    import json
    import subprocess
    import sys

    from pathlib import Path

    cmd = [sys.executable, "-m", "benchmarks.linear", case.name, ",".join(names), str(threads)]
    root = Path(__file__).resolve().parents[1]  # the checkout, whatever the caller's directory
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _case_by_name(name: str) -> "LinearCase":
    return parse(name)


def run_case(case: LinearCase, device, timer: Timer, with_memory: bool, only: str = "") -> dict:
    """``only``: a regular expression; implementations whose name it does not match are skipped
    (fused_wloss always runs)."""
    x, w, y, static = _inputs(case, device)
    impls = {k: v for k, v in implementations(case, device, static).items()
             if k == "fused_wloss" or re.search(only, k)}
    errors = _check({**impls, "_static": static}, x, w, y, case)
    row = {"case": case.name, "shape": list(case.shape), "weighting": case.weighting, "dtype": case.dtype,
           "amp": case.amp, "errors": errors, "impls": {}}
    good = {k: v for k, v in impls.items() if k not in errors}
    items = []
    for name, fn in good.items():
        def run(state, fn=fn):
            return _call(fn, *state, y, case.amp, case.dtype)
        items.append(Timed(name, run, prepare=lambda: _leaves(x, w)))
    stats, failed = timer.run(items)
    errors.update(failed)
    for name, s in stats.items():
        row["impls"][name] = {"fwd+bwd": s}
    if with_memory and stats:
        if device.type == "cuda":
            peaks = {name: peak_bytes(good[name], x, w, y, case) for name in stats}
        else:
            peaks = cpu_peaks_in_subprocess(case, list(stats), torch.get_num_threads())
        for name, peak in peaks.items():
            row["impls"][name]["peak_bytes"] = peak
    return row


def format_rows(rows: List[dict]) -> str:
    names = []
    for r in rows:
        for n in r["impls"]:
            if n not in names:
                names.append(n)
    head = f"{'case':40} " + " ".join(f"{n:>24}" for n in names)
    lines = ["== fused linear + cross-entropy, forward+backward: median ms (peak MB above the inputs); "
             "in brackets: its time / fused_wloss's ==", head]
    for r in rows:
        ours = r["impls"].get("fused_wloss", {}).get("fwd+bwd", {}).get("median_ms")
        cells = []
        for n in names:
            m = r["impls"].get(n)
            if m is None:
                cells.append(f"{'error' if n in r['errors'] else '-':>24}")
                continue
            ms = m["fwd+bwd"]["median_ms"]
            mb = f" {m['peak_bytes'] / 2**20:.0f}MB" if m.get("peak_bytes", -1) >= 0 else ""
            ratio = f" ({ms / ours:.2f}x)" if ours and n != "fused_wloss" else ""
            cells.append(f"{ms:.1f}{mb}{ratio}".rjust(24))
        lines.append(f"{r['case']:40} " + " ".join(cells))
    for r in rows:
        for n, e in r["errors"].items():
            lines.append(f"  {r['case']} {n}: {e}")
    return "\n".join(lines)


def select(full: bool, pattern: str, names: List[str] = ()) -> List[LinearCase]:
    """The cases named (``--case lce-...``), else the set's, filtered by ``pattern``."""
    cases = [parse(n) for n in names] if names else case_set(full)
    return [c for c in cases if re.search(pattern, c.name)]


if __name__ == "__main__":  # python -m benchmarks.linear CASE IMPL,IMPL THREADS: CPU peaks as JSON
    import json
    import sys

    _fixed_mmap_threshold()
    _case = _case_by_name(sys.argv[1])
    torch.set_num_threads(int(sys.argv[3]))
    _x, _w, _y, _static = _inputs(_case, torch.device("cpu"))
    _impls = implementations(_case, torch.device("cpu"), _static)
    _peaks = {}
    for _name in sys.argv[2].split(","):
        _call(_impls[_name], *_leaves(_x, _w), _y, _case.amp, _case.dtype)  # warm up
        _peaks[_name] = peak_bytes(_impls[_name], _x, _w, _y, _case)
    print(json.dumps(_peaks))
