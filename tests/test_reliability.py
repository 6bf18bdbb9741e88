"""Threads and leaks: the compiled CPU operators under concurrent use and under long use.

- Threads: the same calls made from several Python threads at once, each thread with its own
  ``torch.set_num_threads``, give bitwise the results of serial calls. The operators hold shared
  state (the installed kernel table, the cache of released gradient blocks) and per-call scratch
  indexed by OpenMP thread number; the sanitizer lane runs this test against the ASan/UBSan build.
- Leaks: thousands of forward+backward calls keep the resident memory of the process flat, within a
  bound that a leak of one N x C buffer per call would break by a wide margin; the same measurement
  on a deliberate leak of that size proves the bound can fail. Every reading follows glibc's
  ``malloc_trim``, so that memory freed by earlier tests cannot absorb a leak unseen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import threading

import pytest
import torch

import fused_wloss
from fused_wloss import BatchWeighting, _extension

pytestmark = pytest.mark.skipif(
    fused_wloss.backend("cpu") != "extension",
    reason=f"compiled CPU kernels not loaded: {_extension.load_error()}",
)


def _ce_call(shape, dtype, seed, **kwargs):
    """A cross_entropy forward+backward on fixed data: returns a function giving (value, gradient)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    num_classes = shape[1]
    tshape = shape[:1] + shape[2:]
    t = torch.randint(0, num_classes, tshape, generator=gen)
    t = torch.where(torch.rand(tshape, generator=gen) < 0.1, torch.full_like(t, -100), t)
    if kwargs.pop("sample_weight", False):
        kwargs["sample_weight"] = torch.rand(tshape, generator=gen).to(dtype)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(num_classes, generator=gen).to(dtype) + 0.5
    upstream = torch.rand(tshape, generator=gen).to(dtype) if kwargs.get("reduction") == "none" else None

    def call():
        xx = x.detach().requires_grad_()
        out = fused_wloss.cross_entropy(xx, t, **kwargs)
        (g,) = torch.autograd.grad(out, xx, upstream)
        return out.detach(), g

    call.nbytes = x.nbytes
    return call


def _bce_call(shape, dtype, seed, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    y = (torch.rand(shape, generator=gen) < 0.3).to(dtype)
    if kwargs.pop("pos_weight", False):
        kwargs["pos_weight"] = torch.rand(shape[-1], generator=gen).to(dtype) + 0.5
    if kwargs.pop("sample_weight", False):
        kwargs["sample_weight"] = torch.rand(shape[:-1], generator=gen).to(dtype)
    upstream = torch.rand(shape, generator=gen).to(dtype) if kwargs.get("reduction") == "none" else None

    def call():
        xx = x.detach().requires_grad_()
        out = fused_wloss.binary_cross_entropy_with_logits(xx, y, **kwargs)
        (g,) = torch.autograd.grad(out, xx, upstream)
        return out.detach(), g

    call.nbytes = x.nbytes
    return call


def _thread_calls():
    """Every layout (rows, tiled, K-dim) with chunks enough for several OpenMP threads, dynamic
    weights (per-thread class histograms), gradients above and below the 1 MiB cache threshold."""
    return [
        _ce_call((300, 1000), torch.float32, 1, class_weighting="inverse", label_smoothing=0.1),  # 1.2 MB
        _ce_call((4000, 10), torch.float32, 2, weight=True, sample_weight=True, reduction="none"),
        _ce_call((4, 19, 40, 40), torch.bfloat16, 3, class_weighting=BatchWeighting("effective_number", beta=0.99)),
        _ce_call((64, 300), torch.float64, 4, reduction="sample_mean", class_weighting="inverse_sqrt"),
        _bce_call((500, 700), torch.float32, 5, class_weighting="balanced", pos_weight=True),  # 1.4 MB
        _bce_call((3000, 13), torch.float16, 6, sample_weight=True, reduction="none"),
    ]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_concurrent_threads_match_serial_bitwise():
    calls = _thread_calls()
    threads_before = torch.get_num_threads()
    serial = [call() for call in calls]
    num_workers, rounds = 4, 3
    results = [[] for _ in range(num_workers)]
    errors = []
    start = threading.Barrier(num_workers)

    def worker(k):
        try:
            torch.set_num_threads(1 + k % 3)  # 1, 2, 3, 1 intra-op threads
            start.wait()
            for r in range(rounds):
                order = range(len(calls)) if (k + r) % 2 == 0 else reversed(range(len(calls)))
                for i in order:
                    results[k].append((i, calls[i]()))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=worker, args=(k,), name=f"fused_wloss-worker-{k}") for k in range(num_workers)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=600)
    finally:
        torch.set_num_threads(threads_before)
    assert not any(w.is_alive() for w in workers), "a worker thread did not finish"
    assert not errors, errors
    for k in range(num_workers):
        assert len(results[k]) == rounds * len(calls)
        for i, (value, grad) in results[k]:
            assert _bitwise_equal(value, serial[i][0]), f"thread {k}, call {i}: value differs from the serial call"
            assert _bitwise_equal(grad, serial[i][1]), f"thread {k}, call {i}: gradient differs from the serial call"


# ---- leaks ---------------------------------------------------------------------------------------

def _malloc_trim():
    """glibc's malloc_trim, or None. Freed heap memory stays resident (and is reused before the heap
    grows), so without a trim a leak can hide in memory earlier tests freed: with one, the resident
    set is the memory in use."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def _rss_bytes() -> int:
    gc.collect()
    _MALLOC_TRIM(0)  # give every arena's free pages back first
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _growth(fn, iterations: int) -> int:
    """Resident memory in use gained over ``iterations`` calls of ``fn``."""
    before = _rss_bytes()
    for _ in range(iterations):
        fn()
    return _rss_bytes() - before


@pytest.mark.skipif(not sys.platform.startswith("linux") or _MALLOC_TRIM is None,
                    reason="reads the resident set size from /proc and trims glibc's heap")
def test_forward_backward_keeps_resident_memory_flat():
    """2000 rounds of forward+backward over four calls (the gradient cache's path for the two above
    1 MiB, torch's allocator below) after a warm-up: the resident set may grow by at most a tenth
    of what leaking one logits-sized buffer per call would add, and at most 32 MiB. A deliberate
    leak of that size, measured the same way, must exceed the bound."""
    calls = [
        _ce_call((256, 1024), torch.float32, 11, class_weighting="inverse"),  # 1 MiB: the cache
        _ce_call((64, 1000), torch.float32, 12, label_smoothing=0.1, weight=True, reduction="none"),  # 250 KiB
        _ce_call((2, 7, 50, 50), torch.float32, 13, sample_weight=True),
        _bce_call((256, 1100), torch.float32, 14, class_weighting="balanced", pos_weight=True),  # 1.1 MiB
    ]

    def one_round():
        for call in calls:
            call()

    rounds = 2000
    smallest = min(c.nbytes for c in calls)
    leak_per_round = sum(c.nbytes for c in calls)
    bound = min(rounds * smallest // 10, 32 << 20)

    # the control: the same measurement of a leak of one buffer of the smallest call per round
    kept = []
    leak_rounds = 200
    x_small = torch.empty(smallest // 4, dtype=torch.float32)

    def leaking_round():
        one_round()
        kept.append(torch.ones_like(x_small))

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # leaks do not depend on it, and a busy 2-core machine slows OpenMP 10x
    try:
        _growth(one_round, 200)  # warm-up: allocator arenas, the gradient cache, autograd's pools
        growth = _growth(one_round, rounds)
        leaked = _growth(leaking_round, leak_rounds)
    finally:
        torch.set_num_threads(threads_before)
        kept.clear()
    assert growth < bound, (
        f"resident memory grew by {growth / 2**20:.1f} MiB over {rounds} rounds (bound {bound / 2**20:.1f} MiB; "
        f"a leak of one logits-sized buffer per call would add {rounds * leak_per_round / 2**20:.0f} MiB)"
    )
    print(f"resident memory: {growth / 2**20:+.2f} MiB over {rounds} rounds (bound {bound / 2**20:.1f} MiB); "
          f"control leak of {leak_rounds} x {smallest / 2**10:.0f} KiB: {leaked / 2**20:+.2f} MiB")
    assert leaked > leak_rounds * smallest // 2, (
        f"the control leak of {leak_rounds} x {smallest} bytes grew resident memory by only {leaked} bytes"
    )
