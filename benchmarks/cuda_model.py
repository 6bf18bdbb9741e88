"""A prediction, not a measurement: the fraction of the copy floor each CUDA launch plan can reach
on an H100, from the launch configuration (a Python mirror of ce_launch and the BCE launches in
csrc/cuda/losses_host.h) and the registers ptxas reports. Used to predict the lane's shapes before
a GPU measures them; compare with the lane benchmark's "% of floor" once it has run.

    python -m benchmarks.cuda_model            # the lane's shapes, float32 and bfloat16

The model, per kernel pass:
- resident blocks per SM from threads (2048 a SM, 32 blocks) and registers (65536 a SM, allocated
  per warp in units of 256);
- memory-level parallelism: the bytes of loads a resident thread keeps in flight (its loop's
  loads per iteration times their width), times the resident threads of an SM, against what Little's
  law asks of an SM: its share of the copy bandwidth times a loaded DRAM latency of about 800 ns;
- waves: a partial last wave runs at the fraction of the SMs it fills;
- a fixed cost of 3 us a launch (ours and the floor's: the floor is timed as calls too).
It leaves out instruction throughput, caches and DRAM page effects: a prediction to check, never a
result to report as measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

SMS = 132
COPY_BW = 3.0e12  # bytes/s read + written, device-to-device copy on an H100
LATENCY = 800e-9  # loaded DRAM latency, s
LAUNCH = 3e-6  # s a launch
NEED_PER_SM = COPY_BW / SMS * LATENCY  # bytes in flight an SM needs to keep its share busy

# ptxas -v, nvcc 13.0, sm_90, at this commit's kernels: registers a thread
REGISTERS = {
    ("ce_forward_rows", 4): 53, ("ce_forward_rows", 2): 56,
    ("ce_forward_block", 4): 50, ("ce_forward_block", 2): 56,
    ("ce_forward_slice", 4): 30, ("ce_forward_slice", 2): 36,
    ("ce_backward_rows", 4): 56, ("ce_backward_rows", 2): 57,
    ("ce_backward_block", 4): 58, ("ce_backward_block", 2): 48,
    ("ce_forward_pixels_v", 4): 78, ("ce_forward_pixels_v", 2): 100,
    ("ce_forward_pixels_1", 4): 48, ("ce_forward_pixels_1", 2): 48,
    ("ce_backward_pixels_v", 4): 105, ("ce_backward_pixels_v", 2): 156,
    ("ce_backward_pixels_1", 4): 64, ("ce_backward_pixels_1", 2): 64,
    ("bce_forward", 4): 63, ("bce_forward", 2): 56,
    ("bce_backward", 4): 56, ("bce_backward", 2): 62,
}


@dataclass
class Pass:
    kernel: str
    blocks: int
    threads: int
    bytes_moved: float  # read + written by the pass
    inflight_per_thread: float  # bytes of loads a thread keeps in flight


def _resident_blocks(kernel: str, elem: int, threads: int) -> int:
    regs = REGISTERS[(kernel, elem)]
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = 65536 // (per_warp * warps)
    return max(1, min(32, 2048 // threads, by_regs))


def pass_time(p: Pass, elem: int) -> float:
    resident = _resident_blocks(p.kernel, elem, p.threads)
    wave = SMS * resident
    waves = p.blocks / wave
    busy_sms = min(SMS, math.ceil(p.blocks / resident))
    # in flight per busy SM, over the blocks it holds at once
    per_sm_blocks = min(resident, math.ceil(p.blocks / busy_sms))
    inflight = per_sm_blocks * p.threads * p.inflight_per_thread
    mlp = min(1.0, inflight / NEED_PER_SM)
    full_waves = math.floor(waves)
    tail = waves - full_waves
    wave_eff = waves / (full_waves + (1 if tail > 0 else 0)) if waves < 4 else 1.0
    bw = COPY_BW * (busy_sms / SMS) * mlp * (wave_eff if waves >= 1 else 1.0)
    return p.bytes_moved / bw + LAUNCH


def _threads_per_row(C: int, per_vec: int, per_thread: int, max_threads: int) -> int:
    t = 1
    while t < max_threads and t * per_vec * per_thread < C:
        t *= 2
    return t


def ce_plan(shape: Tuple[int, ...], elem: int) -> List[Pass]:
    """The forward and backward passes of class-index cross-entropy (aligned logits, no slicing
    of few K-dim pixels)."""
    N, C = shape[0], shape[1]
    P = math.prod(shape[2:]) if len(shape) > 2 else 1
    rows = N * P
    per_vec = 16 // elem
    logits = rows * C * elem
    if P > 1:
        vectors = P % per_vec == 0 and P // per_vec >= 32 and rows // per_vec >= 132 * 1024
        v = per_vec if vectors else 1
        tiles = P // v
        threads = 32
        while threads < tiles and threads < 256:
            threads *= 2
        blocks = math.ceil(tiles / threads) * N
        k = "v" if vectors else "1"
        per_thread = 4 * v * elem  # four classes' loads of v pixels
        return [Pass(f"ce_forward_pixels_{k}", blocks, threads, logits, per_thread),
                Pass(f"ce_backward_pixels_{k}", blocks, threads, 2 * logits, per_thread)]
    if C <= 4096:
        group = _threads_per_row(C, per_vec, 2, 32)
        blocks = math.ceil(rows / (256 // group))
        per_thread = min(2 * 16, C * elem / group)  # two 16-byte loads, or the row's share
        return [Pass("ce_forward_rows", blocks, 256, logits, per_thread),
                Pass("ce_backward_rows", blocks, 256, 2 * logits, per_thread)]
    threads = max(128, _threads_per_row(C, per_vec, 4, 512))
    slices = 1
    if rows < 264:
        slices = max(1, min(math.ceil(264 / rows), C // 8192))
    blocks = rows * slices
    per_thread = min(2 * 16, C * elem / (threads * slices))
    fwd = "ce_forward_slice" if slices > 1 else "ce_forward_block"
    return [Pass(fwd, blocks, threads, logits, per_thread),
            Pass("ce_backward_block", blocks, threads, 2 * logits, per_thread)]


def bce_plan(shape: Tuple[int, ...], elem: int) -> List[Pass]:
    """BCE with targets of the logits' dtype: the forward reads both, the backward reads both and
    writes the gradient (5 units of traffic against the floor's 4: at most 80% of it)."""
    numel = math.prod(shape)
    per_vec = 16 // elem
    fwd_blocks = math.ceil(numel / 4096)
    bwd_blocks = min(math.ceil(numel / (256 * per_vec)), 1 << 20)
    return [Pass("bce_forward", fwd_blocks, 256, 2 * numel * elem, 2 * 16),
            Pass("bce_backward", bwd_blocks, 256, 3 * numel * elem, 2 * 16)]


# The small launches around the main passes, by weighting: "static" copies the weights to the
# accumulation dtype and finalizes the reduced loss; "dynamic" zeroes the counts, counts, forms the
# weights and finalizes (BCE: two label-sum kernels instead of counting). A split row adds its
# combine kernel (ce_plan's forward kernel "ce_forward_slice").
SMALL_LAUNCHES = {("ce", "static"): 2, ("ce", "dynamic"): 4, ("bce", "static"): 2, ("bce", "dynamic"): 3}


def predict(loss: str, shape: Tuple[int, ...], elem: int, weighting: str = "static") -> Tuple[float, float]:
    """(predicted forward+backward seconds, predicted fraction of the copy floor)."""
    plan = ce_plan(shape, elem) if loss == "ce" else bce_plan(shape, elem)
    t = sum(pass_time(p, elem) for p in plan)
    t += LAUNCH * (SMALL_LAUNCHES[(loss, weighting)] + (plan[0].kernel == "ce_forward_slice"))
    numel = math.prod(shape)
    # the lane benchmark's floor (benchmarks/run.py, floor_calls), timed as calls like ours: the
    # logits read (x.sum()), then read and written by a copy; BCE's targets, as large as the
    # logits, read once more (y.sum()); a launch each
    units, launches = (4, 3) if loss == "bce" else (3, 2)
    floor = units * numel * elem / COPY_BW + launches * LAUNCH
    return t, floor / t


LANE_SHAPES = [("ce", (65536, 10)), ("ce", (16384, 1000)), ("ce", (8192, 32000)), ("ce", (4096, 128000)),
               ("ce", (2048, 256000)), ("ce", (8, 256000)), ("ce", (32, 19, 512, 512)),
               ("bce", (65536, 10)), ("bce", (16384, 1000))]


def main() -> int:
    print("predicted on an H100 (a model, not a measurement; see benchmarks/cuda_model.py)")
    print(f"{'case':<24} {'dtype':<9} {'weighting':<9} {'fwd+bwd us':>11} {'% of floor':>11}")
    for loss, shape in LANE_SHAPES:
        for dtype, elem in (("float32", 4), ("bfloat16", 2)):
            for weighting in ("static", "dynamic"):
                t, frac = predict(loss, shape, elem, weighting)
                name = f"{loss}-{'x'.join(map(str, shape))}"
                print(f"{name:<24} {dtype:<9} {weighting:<9} {t * 1e6:>11.1f} {100 * frac:>10.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
