"""The emulation layer itself (csrc/emu/cuda_emu.h): each primitive on a tiny kernel whose result is
known in closed form, and the misuses a GPU leaves undefined that the layer must report.

The kernels are in csrc/emu/losses_emu.cpp, run by ``torch.ops.fused_wloss_emu.selftest``.
"""

import os

import pytest
import torch

from fused_wloss import ops

try:
    ops.load_emulation()
    _MISSING = None
except ImportError as e:
    _MISSING = str(e)

if _MISSING and os.environ.get("FUSED_WLOSS_REQUIRE_EMU") == "1":
    raise ImportError(f"FUSED_WLOSS_REQUIRE_EMU=1 but fused_wloss._cuda_emu is not built: {_MISSING}")
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"fused_wloss._cuda_emu not built ({_MISSING})")


def run(name, threads, blocks=1):
    return torch.ops.fused_wloss_emu.selftest(name, threads, blocks)


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
def test_group_allreduce_over_shuffle_xor(width):
    threads, blocks = 96, 2
    lane = torch.arange(threads * blocks) % 32
    group_start = lane - lane % width
    expected = sum(group_start + k for k in range(width))  # sum of the lanes of each group
    assert torch.equal(run(f"group_sum_{width}", threads, blocks), expected)


def test_shfl_down_up_idx_and_ballot():
    out = run("shuffles", 64, 2).view(-1, 4)
    lane = torch.arange(128) % 32
    assert torch.equal(out[:, 0], torch.where(lane < 31, (lane + 1) * 10, lane * 10))  # down: last keeps its own
    assert torch.equal(out[:, 1], torch.where(lane > 0, (lane - 1) * 10, lane * 10))  # up: first keeps its own
    assert torch.equal(out[:, 2], torch.full((128,), 30))  # broadcast from lane 3
    ballot = sum(1 << k for k in range(0, 32, 3))
    assert torch.equal(out[:, 3], torch.full((128,), ballot))


def test_divergent_half_warps_shuffle_among_themselves():
    out = run("divergent_halves", 64)
    lane = torch.arange(64) % 32
    expected = torch.where(lane < 16, lane ^ 1, (lane ^ 2) + 100)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("threads", [32, 100, 1024])
def test_syncthreads_orders_shared_memory(threads):
    out = run("reverse", threads, 3).view(3, threads)
    for b in range(3):
        assert torch.equal(out[b], b * 1000 + torch.arange(threads - 1, -1, -1))


def test_dynamic_shared_memory():
    out = run("dynamic_reverse", 64, 2).view(2, 64)
    assert torch.equal(out[1], torch.arange(63, -1, -1) * 7)


@pytest.mark.parametrize("threads", [32, 256, 1024])
def test_block_allreduce(threads):
    assert torch.equal(run("block_sum", threads, 2), torch.full((2 * threads,), threads * (threads - 1) // 2))


def test_scratch_reuse_behind_a_barrier_is_correct():
    threads = 128
    out = run("scratch_reuse", threads, 2)
    assert torch.equal(out, torch.full((2 * threads,), threads * (threads - 1) // 2 * 10000 + threads))


def test_a_missing_barrier_before_scratch_reuse_shows_up():
    """Without the trailing barrier warp 0, run ahead (block 0), writes the second call's partial
    into scratch[0] before warps 1-3 have read the first call's result: a GPU may do the same."""
    threads = 128
    expected = threads * (threads - 1) // 2 * 10000 + threads
    out = run("racy_scratch_reuse", threads, 2).view(2, threads)
    assert torch.equal(out[0, :32], torch.full((32,), expected))  # warp 0 read in time
    assert not torch.equal(out[0, 32:], torch.full((threads - 32,), expected))


def test_atomics_across_blocks():
    out = run("atomics", 64, 5)
    assert out[0].item() == 64 * (1 + 2 + 3 + 4 + 5)


@pytest.mark.parametrize("name, message", [
    ("missing_barrier", r"__syncthreads \(line \d+\) not reached by every thread of the block: thread \(0,0,0\) exited"),
    ("mask_without_caller", r"thread \(5,0,0\).*mask 0xffffffdf leaves out the calling lane 5"),
    ("missing_lane", r"mask 0xffffffff waits for lane 31, which has exited"),
    ("read_outside_mask", r"reads lane 1, which is not in its mask 0x00000001"),
    ("device_assert", r"thread \(3,0,0\): device-side assertion failed: thread 3 may not pass"),
    ("group_sum_3", r"shuffle width 3 \(line \d+\) is not a power of 2 <= 32"),
])
def test_misuse_is_reported(name, message):
    with pytest.raises(RuntimeError, match=message):
        run(name, 64)


def test_invalid_launches_are_refused():
    with pytest.raises(RuntimeError, match="selftest: bad launch"):
        run("reverse", 2048)
    with pytest.raises(RuntimeError, match="no kernel named"):
        run("nope", 32)


def test_misaligned_vector_access_is_reported():
    """A 16-byte load_pack/store_pack at an address that is not 16-byte aligned faults on a GPU;
    the emulation reports it where the kernels' own alignment logic would have let one through."""
    with pytest.raises(RuntimeError, match="misaligned 16-byte vector access"):
        run("misaligned_pack", 32)


def test_dynamic_shared_memory_beyond_48k_is_refused():
    with pytest.raises(RuntimeError, match="more than the 49152 a kernel gets without opting in"):
        run("dynamic_smem_over_48k", 32)


def test_static_shared_memory_is_poisoned_per_block():
    """A block's static shared memory starts as 0xFF bytes, not as what the previous block (here
    the same kernel, which stores blockIdx + 1) left in it: a kernel that reads shared memory it
    did not write gets -1 (NaN for floats) instead of a plausible value only the emulation gives."""
    for _ in range(2):  # and again in a second launch
        out = run("stale_shared", 32, 4).view(4, 32)
        assert torch.equal(out[:, 0], torch.full((4,), -1))


def test_shuffled_block_order(monkeypatch):
    """FWL_EMU_BLOCK_ORDER=shuffle[:seed] runs every block once, in an order of its own per seed."""
    blocks = 37
    monkeypatch.delenv("FWL_EMU_BLOCK_ORDER", raising=False)
    out = run("block_order", 32, blocks)
    assert out[0].item() == blocks and torch.equal(out[1:], torch.arange(blocks))
    orders = []
    for seed in ("1", "2"):
        monkeypatch.setenv("FWL_EMU_BLOCK_ORDER", f"shuffle:{seed}")
        out = run("block_order", 32, blocks)
        assert torch.equal(out[1:].sort().values, torch.arange(blocks))  # a permutation
        assert not torch.equal(out[1:], torch.arange(blocks))
        orders.append(out[1:])
    assert not torch.equal(orders[0], orders[1])


def test_kernels_give_the_same_bits_in_any_block_order(monkeypatch):
    """The loss kernels' results do not depend on the order blocks run in (fixed-order
    reductions, no order-dependent atomics on floats): every operator, in index order and two
    shuffled orders, bitwise."""
    import fused_wloss
    from fused_wloss import BatchWeighting

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 37, generator=gen)
    t = torch.randint(0, 37, (300,), generator=gen)
    q = torch.softmax(torch.randn(300, 37, generator=gen), -1)
    y = (torch.rand(300, 37, generator=gen) < 0.3).float()
    wide = torch.randn(6, 5000, generator=gen)
    tw = torch.randint(0, 5000, (6,), generator=gen)

    def everything():
        out = []
        for fn, args, kw in [
            (fused_wloss.cross_entropy, (x, t), {"class_weighting": "inverse", "label_smoothing": 0.1}),
            (fused_wloss.cross_entropy, (wide, tw), {"class_weighting": BatchWeighting("inverse_sqrt")}),
            (fused_wloss.cross_entropy, (x, q), {"class_weighting": "inverse"}),
            (fused_wloss.binary_cross_entropy_with_logits, (x, y), {"class_weighting": "balanced"}),
        ]:
            leaf = args[0].clone().requires_grad_(True)
            loss = fn(leaf, *args[1:], **kw)
            loss.backward()
            out += [loss.detach(), leaf.grad]
        return out

    with ops.use_namespace("fused_wloss_emu"):
        monkeypatch.delenv("FWL_EMU_BLOCK_ORDER", raising=False)
        base = everything()
        for seed in ("3", "11"):
            monkeypatch.setenv("FWL_EMU_BLOCK_ORDER", f"shuffle:{seed}")
            for a, b in zip(everything(), base):
                assert torch.equal(a, b)
