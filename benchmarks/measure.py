"""How the driver measures: the correctness guard, times, peak memory and bytes saved for backward.

Times: every implementation of a case (and the memory floor) is timed in the same process,
round-robin (one call of each per round), so that a change in the machine's load touches all of
them alike and the ratios stay meaningful on a busy machine. Each call gets its inputs ready
untimed (a forward for the backward-only time, a fresh copy of the logits for implementations that
write into them, on CUDA a flush of the L2 cache); on CUDA a call is timed with a pair of
torch.cuda.Event, on the CPU with time.perf_counter. The result is the median with the quartiles.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
On the CPU, the PyTorch profiler's allocation events (``profile_memory=True``): the running sum of
every allocation and free made through torch's CPU allocator during the call, and its maximum.
fused_wloss hands out large CPU gradients from its own block cache, which that allocator does not
see: a gradient whose memory the profiler did not see allocated is added, at its full size, from the
start of the backward on.

Bytes saved for backward: ``torch.autograd.graph.saved_tensors_hooks`` around the forward records
every tensor autograd keeps for the backward; counted once per storage and not counting the
storages of the inputs (the logits, targets and weights exist anyway): the memory a forward adds
until its backward runs.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
# bytes the memory-traffic model moves, in units of the logits' size: the forward reads the logits
# once; the backward reads them once and writes the gradient once
TRAFFIC = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the correctness guard ---------------------------------------------------------------------------

def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]


def value_and_grad(fn: Callable, inputs):
    """The loss and the gradient of the logits (from a fresh copy of them), in float64."""
    xx = inputs.x.detach().clone().requires_grad_()
    loss = fn(xx, inputs.y, inputs.w, inputs.s)
    if loss.dim() != 0:
        raise ValueError(f"expected a scalar loss, got shape {tuple(loss.shape)}")
    (g,) = torch.autograd.grad(loss, xx)
    return loss.detach().double(), g.double()


def disagreement(got, want, tol: float) -> Optional[str]:
    """None if ``got`` (value, gradient) matches ``want``, else what differs. The value is compared
    relative to itself, the gradient relative to its largest element."""
    (v, g), (v0, g0) = got, want
    if not (torch.isfinite(v) and torch.isfinite(g).all()):
        return "non-finite loss or gradient"
    if g.shape != g0.shape:
        return f"gradient shape {tuple(g.shape)}, expected {tuple(g0.shape)}"
    dv = float((v - v0).abs() / v0.abs().clamp_min(1e-30))
    scale = float(g0.abs().max()) if g0.numel() else 0.0
    dg = float((g - g0).abs().max() / max(scale, 1e-30)) if g0.numel() else 0.0
    if dv > tol or dg > tol:
        return f"relative difference: loss {dv:.2e}, gradient {dg:.2e} (tolerance {tol:.0e})"
    return None


# -- timing ------------------------------------------------------------------------------------------

class Timed:
    """A call to time: ``prepare()`` runs untimed before each call and its result is passed to ``run``."""

    def __init__(self, key, run: Callable, prepare: Optional[Callable] = None):
        self.key, self.run, self.prepare = key, run, prepare
        self.times: List[float] = []


class Timer:
    def __init__(self, device: torch.device, min_time: float, min_reps: int, max_reps: int, warmup: int = 2):
        self.device, self.min_time, self.min_reps, self.max_reps = device, min_time, min_reps, max_reps
        self.warmup = warmup
        self._l2 = None
        if device.type == "cuda":
            # larger than the L2 of any current GPU (50 MB on an H100): zeroed before each timed call
            self._l2 = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def _once(self, item: Timed) -> float:
        state = item.prepare() if item.prepare is not None else None
        if self._l2 is not None:
            self._l2.zero_()
        sync(self.device)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = item.run(state)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            out = item.run(state)
            ms = (time.perf_counter() - t0) * 1e3
        del out, state  # freed after the clock stopped
        return ms

    def run(self, items: List[Timed]) -> Tuple[Dict[object, dict], Dict[object, str]]:
        """Round-robin over ``items`` until each has ``min_reps`` calls and ``min_time`` seconds of
        them (or ``max_reps`` calls); the order rotates from round to round. Returns the statistics
        of each item and, apart, the error of each item that raised (it is dropped, the rest go on)."""
        failed: Dict[object, str] = {}

        def once(item):
            try:
                return self._once(item)
            except Exception as e:
                failed[item.key] = f"{type(e).__name__}: {str(e).strip()[:160]}"
                return None

        for item in items:
            for _ in range(self.warmup):
                if item.key not in failed:
                    once(item)
        active = [i for i in items if i.key not in failed]
        rnd = 0
        while active:
            k = rnd % len(active)
            for item in active[k:] + active[:k]:
                ms = once(item)
                if ms is not None:
                    item.times.append(ms)
            rnd += 1
            active = [i for i in active
                      if i.key not in failed and len(i.times) < self.max_reps
                      and (len(i.times) < self.min_reps or sum(i.times) < self.min_time * 1e3)]
        return {i.key: summarize(i.times) for i in items if i.key not in failed}, failed


def summarize(times: List[float]) -> dict:
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {"median_ms": statistics.median(times), "q1_ms": q1, "q3_ms": q3, "min_ms": min(times),
            "reps": len(times)}


# -- other processes ---------------------------------------------------------------------------------

class OtherLoad:
    """The share of the machine's CPU time that other processes used between ``start`` and ``stop``
    (Linux: /proc/stat's busy time minus this process's own CPU time), or None where unknown. On a
    shared machine it tells which timings other jobs disturbed: a 2-thread parallel region waits for
    whichever of its threads another process has descheduled, so small calls inflate most."""

    def __init__(self):
        self._start = None

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle, iowait
        t = os.times()
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system

    def start(self):
        self._start = self._sample()

    def stop(self) -> Optional[float]:
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, min(1.0, others / (wall * (os.cpu_count() or 1)))) if wall > 0 else None


# -- memory ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs its start and stop on file descriptor 2: hide that."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, other than ``exclude``'s."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: Dict[int, int] = {}

    def pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self.exclude:
            self.storages[st.data_ptr()] = st.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def memory(fn: Callable, inputs, device: torch.device, destructive: bool, backward: bool) -> dict:
    """Peak memory above the inputs of one call (forward under no_grad, or forward+backward), the
    bytes saved for backward, and whether a fused_wloss operator ran (CPU: from the profile)."""
    x = inputs.x.detach().clone() if destructive else inputs.x.detach()
    others = (inputs.y, inputs.w, inputs.s)
    xg = x.clone().requires_grad_() if backward else x
    saved = SavedBytes([xg, *others])

    def call():
        if not backward:
            with torch.no_grad():
                return fn(xg, *others), None
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            with torch.profiler.record_function("bench::forward"):
                loss = fn(xg, *others)
        with torch.profiler.record_function("bench::backward"):
            (g,) = torch.autograd.grad(loss, xg)
        return loss, g

    out = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss, g = call()
        sync(device)
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        from torch.profiler import ProfilerActivity, profile
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss, g = call()
        out.update(_cpu_peak(prof, g))
    if backward:
        out["saved_bytes"] = saved.nbytes
    return out


def _cpu_peak(prof, grad) -> dict:
    allocs, seen, ops = [], set(), set()
    backward_start = None

    def walk(events):
        nonlocal backward_start
        for e in events:
            extra = e.typed[1]
            if type(extra).__name__ == "_ExtraFields_Allocation":
                allocs.append((e.start_time_ns, extra.alloc_size))
                if extra.alloc_size > 0:
                    seen.add(extra.ptr)
            else:
                if e.name.startswith("fused_wloss::"):
                    ops.add(e.name)
                if e.name == "bench::backward" and backward_start is None:
                    backward_start = e.start_time_ns
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    unseen = 0
    if grad is not None and grad.untyped_storage().data_ptr() not in seen:
        unseen = grad.untyped_storage().nbytes()
    current = peak = 0
    for t, size in sorted(allocs, key=lambda a: a[0]):
        current += size
        extra = unseen if backward_start is not None and t >= backward_start else 0
        peak = max(peak, current + extra)
    peak = max(peak, current + unseen)  # the gradient is alive at the end
    return {"peak_bytes": peak, "fused_ops": sorted(ops), "grad_outside_torch_allocator": bool(unseen)}
