"""What only a GPU can prove about the CUDA kernels (every test here is marked ``gpu``: the CUDA lane
runs them; without a GPU they skip, and the lane's dry run runs the ones that fit the emulated kernels).

- the 16-byte vector loads and stores of float32/float16/bfloat16 on aligned rows (the offset-1 tests
  of test_cuda_kernels.py turn them off);
- focal loss on the GPU;
- launches of more than 65,535 blocks, a row of 256k bfloat16 classes, an input of more than 2^31
  elements (int64 indexing); the K-dim pixel grid at a size that takes its vectors on a GPU, and
  with more images than a grid has rows;
- CUDA-graph replay on new data copied into the captured inputs, torch.compile(mode="reduce-overhead");
- bitwise repeatability of the probability-target and BCE kernels;
- the GPU's float64 results against the emulated kernels' on the same seeded inputs, carried as
  tests/data/emulated_results.pt (``python tests/test_gpu_proof.py`` rewrites it here).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fused_wloss
from fused_wloss import BatchWeighting, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import (assert_close, emulation_namespace, gpu_calls, gpu_device, requires_real_gpu,  # noqa: E402
                     skip_without_gpu, value_and_grad)
from samples import Sample  # noqa: E402

pytestmark = pytest.mark.gpu
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "emulated_results.pt")


@pytest.fixture
def gpu():
    skip_without_gpu()
    with gpu_calls():
        yield torch.device(gpu_device())


def _ref64(fn, x, t, kw):
    kw64 = {k: v.detach().cpu().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else
            (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    t64 = t.cpu().double() if t.is_floating_point() else t.cpu()
    return value_and_grad(fn, Sample("ref", (x.detach().cpu().double(), t64), kw64, False))


def _move(kw, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(64, 8), (40, 32), (16, 1024), (4, 8192), (3, 16, 64)], ids=str)
def test_aligned_rows_take_the_vector_paths(gpu, dtype, shape):
    """C a multiple of every pack size and rows starting 16-byte aligned: every load and store of
    the row kernels is a vector one."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(gpu)
    assert x.data_ptr() % 16 == 0
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen).to(gpu)
    kw = _move({"weight": (torch.rand(shape[1], generator=gen) + 0.5).to(dtype), "label_smoothing": 0.1,
                "reduction": "none"}, gpu)
    got = value_and_grad(fused_wloss.cross_entropy, Sample("gpu", (x, t), kw, True))
    want = _ref64(reference.cross_entropy, x, t, kw)
    assert_close(got[0].cpu().double(), want[0], dtype, "value")
    assert_close(got[1].cpu().double(), want[1], dtype, "gradient")
    q = torch.softmax(torch.randn(shape, generator=gen), dim=1).to(dtype).to(gpu)
    got = value_and_grad(fused_wloss.cross_entropy, Sample("gpu", (x, q), kw, True))
    want = _ref64(reference.cross_entropy, x, q, kw)
    assert_close(got[0].cpu().double(), want[0], dtype, "soft value")
    assert_close(got[1].cpu().double(), want[1], dtype, "soft gradient")
    y = (torch.rand(shape, generator=gen) < 0.3).to(dtype).to(gpu)
    got = value_and_grad(fused_wloss.binary_cross_entropy_with_logits, Sample("gpu", (x, y), {"reduction": "none"}, True))
    want = _ref64(reference.binary_cross_entropy_with_logits, x, y, {"reduction": "none"})
    assert_close(got[0].cpu().double(), want[0], dtype, "bce value")
    assert_close(got[1].cpu().double(), want[1], dtype, "bce gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_focal_loss(gpu, dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(300, 40, generator=gen) * 3).to(dtype).to(gpu)
    t = torch.randint(0, 40, (300,), generator=gen).to(gpu)
    kw = {"gamma": 2.0, "class_weighting": "inverse", "reduction": "none"}
    got = value_and_grad(fused_wloss.cross_entropy, Sample("gpu", (x, t), kw, False))
    want = _ref64(reference.cross_entropy, x, t, kw)
    assert_close(got[0].cpu().double(), want[0], dtype, "ce focal value")
    assert_close(got[1].cpu().double(), want[1], dtype, "ce focal gradient")
    y = (torch.rand(300, 40, generator=gen) < 0.2).to(dtype).to(gpu)
    kw = {"gamma": 2.0, "alpha": 0.25, "class_weighting": "balanced", "reduction": "none"}
    got = value_and_grad(fused_wloss.binary_cross_entropy_with_logits, Sample("gpu", (x, y), kw, False))
    want = _ref64(reference.binary_cross_entropy_with_logits, x, y, kw)
    assert_close(got[0].cpu().double(), want[0], dtype, "bce focal value")
    assert_close(got[1].cpu().double(), want[1], dtype, "bce focal gradient")


def _check_rows(x, t, rows, dtype, what, **kw):
    """fused_wloss over the whole input, against the reference on the given rows alone."""
    kw["reduction"] = "none"
    out = fused_wloss.cross_entropy(x, t, **kw)
    for r in rows:
        want = reference.cross_entropy(x[r:r + 1].double(), t[r:r + 1], **_move(kw, x.device))
        torch.testing.assert_close(out[r:r + 1].double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-3, msg=lambda m: f"{what}, row {r}: {m}")


def test_more_than_65535_blocks():
    requires_real_gpu()
    gen = torch.Generator(device="cuda").manual_seed(3)
    # a block per row (C > 4096): 70,000 blocks
    x = torch.randn(70000, 4097, generator=gen, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 4097, (70000,), generator=gen, device="cuda")
    _check_rows(x, t, [0, 65535, 65536, 69999], torch.bfloat16, "block per row")
    g = torch.autograd.grad(fused_wloss.cross_entropy(x.requires_grad_(True), t, reduction="sum"), x)[0]
    want = torch.softmax(x[-1].double(), 0)
    want[t[-1]] -= 1
    torch.testing.assert_close(g[-1].double(), want, rtol=2e-2, atol=1e-3)
    # grouped rows (C = 10: 128 rows a block): 9M rows, 70,313 blocks
    x = torch.randn(9_000_000, 10, generator=gen, device="cuda")
    t = torch.randint(0, 10, (9_000_000,), generator=gen, device="cuda")
    _check_rows(x, t, [0, 8_388_607, 8_999_999], torch.float32, "grouped rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
def test_kdim_pixel_grid_at_full_size(dtype, offset):
    """K-dim logits large enough for the pixel grid's 16-byte vectors of pixels on the GPU (at least
    132 x 1024 vectors; the emulation takes them at any size), and misaligned (a pixel a thread),
    against the float64 reference on the GPU."""
    requires_real_gpu()
    gen = torch.Generator(device="cuda").manual_seed(7)
    shape = (80, 19, 128, 128)
    flat = torch.randn(offset + 80 * 19 * 128 * 128, generator=gen, device="cuda") * 3
    x = flat.to(dtype)[offset:].view(shape)
    assert (x.data_ptr() % 16 == 0) == (offset == 0)
    t = torch.randint(0, 19, (80, 128, 128), generator=gen, device="cuda")
    t[:, ::7] = -100
    w = torch.rand(19, generator=gen, device="cuda").to(dtype) + 0.5
    for kw in ({"weight": w, "label_smoothing": 0.1, "reduction": "none"}, {"class_weighting": "inverse"}):
        got = value_and_grad(fused_wloss.cross_entropy, Sample("gpu", (x, t), kw, False))
        kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        want = value_and_grad(reference.cross_entropy, Sample("ref", (x.double(), t), kw64, False))
        assert_close(got[0].double(), want[0], dtype, "value")
        assert_close(got[1].double(), want[1], dtype, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_soft_target_rows_take_a_block_per_row(dtype):
    """Probability targets over 4100 classes with rows enough (264 or more) for the block-per-row
    backward on a GPU (the emulation takes it from 4 rows), against the float64 reference."""
    requires_real_gpu()
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = (torch.randn(300, 4100, generator=gen, device="cuda") * 3).to(dtype)
    q = torch.softmax(torch.randn(300, 4100, generator=gen, device="cuda") * 2, -1).to(dtype)
    kw = {"label_smoothing": 0.1, "reduction": "none"}
    got = value_and_grad(fused_wloss.cross_entropy, Sample("gpu", (x, q), kw, False))
    want = value_and_grad(reference.cross_entropy, Sample("ref", (x.double(), q.double()), kw, False))
    assert_close(got[0].double(), want[0], dtype, "value")
    assert_close(got[1].double(), want[1], dtype, "gradient")


def test_kdim_images_past_the_grid_rows():
    """More images than a grid has rows of blocks (65535): the pixel grid walks the rest."""
    requires_real_gpu()
    gen = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(70000, 3, 32, generator=gen, device="cuda")
    t = torch.randint(0, 3, (70000, 32), generator=gen, device="cuda")
    got = value_and_grad(fused_wloss.cross_entropy, Sample("gpu", (x, t), {"reduction": "none"}, True))
    want = value_and_grad(reference.cross_entropy, Sample("ref", (x.double(), t), {"reduction": "none"}, False))
    assert_close(got[0].double(), want[0], torch.float32, "value")
    assert_close(got[1].double(), want[1], torch.float32, "gradient")
    assert got[0][65535:].abs().min() > 0  # the images past the grid's rows were written


def test_a_row_of_256k_bfloat16_classes():
    requires_real_gpu()
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = (torch.randn(4, 262144, generator=gen, device="cuda") * 4).to(torch.bfloat16)
    t = torch.randint(0, 262144, (4,), generator=gen, device="cuda")
    got = value_and_grad(fused_wloss.cross_entropy, Sample("gpu", (x, t), {"reduction": "none"}, True))
    want = _ref64(reference.cross_entropy, x, t, {"reduction": "none"})
    assert_close(got[0].cpu().double(), want[0], torch.bfloat16, "value")
    assert_close(got[1].cpu().double(), want[1], torch.bfloat16, "gradient")


def test_bfloat16_input_of_more_than_2_to_the_31_elements():
    requires_real_gpu()
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GB of GPU memory")
    rows, C = 16385, 131072  # 2,147,614,720 elements: past 2^31
    x = torch.empty(rows, C, device="cuda", dtype=torch.bfloat16).normal_()
    t = torch.randint(0, C, (rows,), device="cuda")
    _check_rows(x, t, [0, rows // 2, rows - 1], torch.bfloat16, "2^31 elements")
    g = torch.autograd.grad(fused_wloss.cross_entropy(x.requires_grad_(True), t, reduction="sum"), x)[0]
    want = torch.softmax(x[-1].double(), 0)
    want[t[-1]] -= 1
    torch.testing.assert_close(g[-1].double(), want, rtol=2e-2, atol=1e-4)


def test_cuda_graph_replays_on_new_data():
    requires_real_gpu()
    gen = torch.Generator(device="cuda").manual_seed(5)
    kw = {"class_weighting": BatchWeighting("effective_number", beta=0.99), "label_smoothing": 0.1,
          "weight": torch.rand(1000, generator=gen, device="cuda") + 0.1,
          "sample_weight": torch.rand(512, generator=gen, device="cuda") + 0.1}
    static_x = torch.randn(512, 1000, generator=gen, device="cuda", requires_grad=True)
    static_t = torch.randint(0, 1000, (512,), generator=gen, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fused_wloss.cross_entropy(static_x, static_t, **kw).backward()
    torch.cuda.current_stream().wait_stream(s)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fused_wloss.cross_entropy(static_x, static_t, **kw)
        loss.backward()
    for step in range(3):  # new data each replay, copied into the captured inputs
        x = torch.randn(512, 1000, generator=gen, device="cuda") * (step + 1)
        t = torch.randint(0, 1000 if step else 3, (512,), generator=gen, device="cuda")  # other counts too
        t[torch.rand(512, generator=gen, device="cuda") < 0.2] = -100  # and ignored targets
        with torch.no_grad():
            static_x.copy_(x)
        static_t.copy_(t)
        static_x.grad.zero_()
        graph.replay()
        want_loss, want_grad = _ref64(reference.cross_entropy, x, t, kw)
        torch.testing.assert_close(loss.detach().cpu().double(), want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(static_x.grad.cpu().double(), want_grad, rtol=1e-4, atol=1e-7)


def test_compile_reduce_overhead_on_new_data():
    requires_real_gpu()
    gen = torch.Generator(device="cuda").manual_seed(6)

    def step(x, t, q):
        return (fused_wloss.cross_entropy(x, t, class_weighting="inverse")
                + fused_wloss.cross_entropy(x, q, label_smoothing=0.1)
                + fused_wloss.binary_cross_entropy_with_logits(x, q, class_weighting="balanced"))

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        x = torch.randn(256, 100, generator=gen, device="cuda", requires_grad=True)
        t = torch.randint(0, 100, (256,), generator=gen, device="cuda")
        q = torch.softmax(torch.randn(256, 100, generator=gen, device="cuda"), 1)
        out = compiled(x, t, q)
        (g,) = torch.autograd.grad(out, x)
        xe = x.detach().clone().requires_grad_(True)
        expected = step(xe, t, q)
        (ge,) = torch.autograd.grad(expected, xe)
        torch.testing.assert_close(out.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ["ce", "bce"])
def test_backward_operators_refuse_host_tensors(op):
    """A host tensor among a backward operator's arguments would be read by the kernel as a device
    address (an illegal-address fault that ends the process's CUDA context): a clear error instead."""
    requires_real_gpu()
    x = torch.randn(8, 5, device="cuda")
    if op == "ce":
        t = torch.randint(0, 5, (8,), device="cuda")
        _, lse, cw, norm = torch.ops.fused_wloss.cross_entropy_forward(x, t, None, None, -100, 0.0, 2, 0, 1.0, 0.999)
        with pytest.raises(RuntimeError, match="lse must be on the input's device"):
            torch.ops.fused_wloss.cross_entropy_backward(torch.ones((), device="cuda"), x, t, cw, None, lse.cpu(),
                                                         norm, -100, 0.0, 2)
        with pytest.raises(RuntimeError, match="grad_loss must be on the input's device"):
            torch.ops.fused_wloss.cross_entropy_backward(torch.ones(()), x, t, cw, None, lse, norm, -100, 0.0, 2)
    else:
        y = (torch.rand(8, 5, device="cuda") < 0.5).float()
        _, neg, pos = torch.ops.fused_wloss.bce_forward(x, y, None, None, None, 2, 1, 1.0, 0.999, False)
        with pytest.raises(RuntimeError, match="pos_label_weight must be on the input's device"):
            torch.ops.fused_wloss.bce_backward(torch.ones((), device="cuda"), x, y, None, None, None, neg, pos.cpu(), 2)
    torch.cuda.synchronize()  # the context is still usable


@pytest.mark.parametrize("kind", ["soft", "bce"])
def test_bitwise_repeatable(gpu, kind):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2000, 300, generator=gen).to(gpu)
    if kind == "soft":
        t = torch.softmax(torch.randn(2000, 300, generator=gen), 1).to(gpu)
        fn, kw = fused_wloss.cross_entropy, {"label_smoothing": 0.1, "class_weighting": "inverse"}
    else:
        t = (torch.rand(2000, 300, generator=gen) < 0.3).float().to(gpu)
        fn, kw = fused_wloss.binary_cross_entropy_with_logits, {"class_weighting": "balanced"}
    runs = [value_and_grad(fn, Sample("gpu", (x, t), kw, False)) for _ in range(3)]
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


# ---- the GPU against the emulated kernels, on the same seeded inputs -----------------------------

def _emulated_cases():
    """Seeded float64 calls covering every kernel family and mapping."""
    gen = torch.Generator().manual_seed(8)
    cases = []
    for shape in [(300, 3), (40, 33), (9, 130), (3, 4097), (5, 6, 37)]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
        t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
        w = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
        cases.append(("ce", x, t, {"weight": w, "label_smoothing": 0.1, "class_weighting": "inverse",
                                   "reduction": "none"}))
        q = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), 1)
        cases.append(("ce", x, q, {"weight": w, "label_smoothing": 0.1, "reduction": "none"}))
    for shape in [(1000, 10), (7, 3, 33)]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 4
        y = (torch.rand(shape, generator=gen) < 0.2).double()
        cases.append(("bce", x, y, {"class_weighting": BatchWeighting("inverse", balanced=True), "reduction": "none"}))
    return cases


def _run_cases(device):
    out = []
    for loss, x, t, kw in _emulated_cases():
        fn = fused_wloss.cross_entropy if loss == "ce" else fused_wloss.binary_cross_entropy_with_logits
        value, grad = value_and_grad(fn, Sample(loss, (x.to(device), t.to(device)), _move(kw, device), False))
        out.append((value.cpu(), grad.cpu()))
    return out


def test_gpu_matches_the_emulated_kernels(gpu):
    """float64 results of the GPU to 1e-12 of the emulated kernels' (the file); in the dry run the
    emulated kernels against the file itself (it must be rewritten when the kernels change)."""
    if not os.path.exists(RESULTS):
        pytest.fail(f"{RESULTS} is missing: run `python tests/test_gpu_proof.py` where the emulator is built")
    saved = torch.load(RESULTS)
    got = _run_cases(gpu)
    assert len(saved) == len(got)
    for i, ((v, g), (sv, sg)) in enumerate(zip(got, saved)):
        torch.testing.assert_close(v, sv, rtol=1e-12, atol=1e-14, msg=lambda m: f"case {i} value: {m}")
        torch.testing.assert_close(g, sg, rtol=1e-12, atol=1e-14, msg=lambda m: f"case {i} gradient: {m}")


def _emulated_results_are_current():
    """Here, with the emulator built: the file holds what the emulated kernels compute now."""
    from fused_wloss import ops

    ns = emulation_namespace()
    if ns is None:
        pytest.skip("the emulated CUDA kernels are not built")
    if not os.path.exists(RESULTS):
        pytest.fail(f"{RESULTS} is missing: run `python tests/test_gpu_proof.py`")
    with ops.use_namespace(ns):
        got = _run_cases(torch.device("cpu"))
    saved = torch.load(RESULTS)
    assert len(saved) == len(got), f"{RESULTS} holds {len(saved)} cases, the test {len(got)}: rewrite it"
    for i, ((v, g), (sv, sg)) in enumerate(zip(got, saved)):
        # to the GPU comparison's tolerance (a build with other flags, the sanitizers', may round
        # differently in the last bit)
        for a, b in ((v, sv), (g, sg)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: (
                f"case {i}: the emulated kernels no longer give the results in {RESULTS} ({m}); if the kernels "
                "changed on purpose, rewrite it with `python tests/test_gpu_proof.py`"))


if __name__ == "__main__":  # rewrite the emulated results (where fused_wloss._cuda_emu is built)
    from fused_wloss import ops

    ns = emulation_namespace()
    if ns is None:
        sys.exit("the emulated CUDA kernels are not built: run `make setup`")
    with ops.use_namespace(ns):
        results = _run_cases(torch.device("cpu"))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    torch.save(results, RESULTS)
    print(f"wrote {RESULTS}: {len(results)} cases")
