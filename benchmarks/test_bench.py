"""pytest-benchmark benchmarks: ``pytest benchmarks --benchmark-only [--bench-device cuda]``.

A small set of cases, each implementation's forward, backward and forward+backward, grouped by case
and mode so that pytest-benchmark's table compares the implementations of one case. Every benchmark
first checks that its implementation computes the reference's loss and gradient on the case's
inputs. ``python -m benchmarks`` (benchmarks/run.py) is the fuller driver: floor, memory, plots.

Not part of the test suite: ``pytest tests`` (``make test``) does not collect this directory.
"""

import functools

import pytest
import torch

from . import measure
from .cases import Case, implementations, liger_cross_entropy

CASES = [
    Case("ce", (65536, 10), "dynamic"),
    Case("ce", (8192, 1000), "static"),
    Case("ce", (8192, 1000), "dynamic"),
    Case("ce", (8192, 1000), "sample"),
    Case("ce", (1024, 32000), "dynamic"),
    Case("ce", (4, 19, 256, 256), "dynamic"),
    Case("bce", (8192, 1000), "dynamic"),
    Case("ce", (8192, 1000), "static", "bfloat16"),
]
IMPLS = ["fused_wloss", "reference", "torch", "recipe", "compile(torch)", "compile(recipe)"]
CUDA_ONLY_IMPLS = ["liger"]  # Liger-Kernel's Triton cross entropy, when it is installed
MODES = ["fwd", "bwd", "fwd+bwd"]

# every case compiles the same torch code for a new shape: allow more than the default 8 versions
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
setattr(torch._dynamo.config, _LIMIT, max(getattr(torch._dynamo.config, _LIMIT), 256))


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--bench-device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda: torch sees no CUDA GPU on this machine", returncode=2)
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def _case_setup(case: Case, device: torch.device):
    """Inputs, implementations and the reference's answer, once per case."""
    liger = liger_cross_entropy()[0] if device.type == "cuda" else None
    inputs = case.make_inputs(device)
    impls = implementations(case, device, "all", liger)
    want = measure.value_and_grad(impls["reference"].fn, inputs)
    return inputs, impls, want


def _synced(fn, device):
    if device.type != "cuda":
        return fn

    def go(*args):
        out = fn(*args)
        torch.cuda.synchronize(device)
        return out
    return go


def pytest_generate_tests(metafunc):
    if "impl_name" in metafunc.fixturenames:
        cuda = metafunc.config.getoption("--bench-device") == "cuda"
        metafunc.parametrize("impl_name", IMPLS + (CUDA_ONLY_IMPLS if cuda else []))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_loss(benchmark, case, impl_name, mode, device):
    inputs, impls, want = _case_setup(case, device)
    if impl_name not in impls:
        pytest.skip(f"{impl_name} does not apply to {case.name} on {device.type}")
    impl = impls[impl_name]
    tol = measure.tolerance(case.torch_dtype) * (1 if case.dtype == "float32" or impl_name == "fused_wloss" else 4)
    problem = measure.disagreement(measure.value_and_grad(impl.fn, inputs), want, tol)
    assert problem is None, f"{impl_name} disagrees with the reference on {case.name}: {problem}"

    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(logits_mb=case.logits_bytes / 2**20, device=device.type)
    fn, y, w, s = impl.fn, inputs.y, inputs.w, inputs.s
    x = inputs.x
    leaf = x.detach().clone().requires_grad_()

    def fresh_leaf():
        return x.detach().clone().requires_grad_() if impl.destructive else leaf

    if mode == "fwd":
        def forward(xx):
            with torch.no_grad():
                return fn(xx, y, w, s)
        setup = lambda: ((x.clone() if impl.destructive else x,), {})  # noqa: E731
        benchmark.pedantic(_synced(forward, device), setup=setup, rounds=_rounds(case), warmup_rounds=1)
    elif mode == "fwd+bwd":
        def forward_backward(xx):
            return torch.autograd.grad(fn(xx, y, w, s), xx)
        benchmark.pedantic(_synced(forward_backward, device), setup=lambda: ((fresh_leaf(),), {}),
                           rounds=_rounds(case), warmup_rounds=1)
    else:
        def setup():
            xx = fresh_leaf()
            loss = fn(xx, y, w, s)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (xx, loss), {}

        def backward(xx, loss):
            return torch.autograd.grad(loss, xx)
        benchmark.pedantic(_synced(backward, device), setup=setup, rounds=_rounds(case), warmup_rounds=1)


def _rounds(case: Case) -> int:
    """About a quarter of a second of the slowest implementations per benchmark."""
    mb = case.logits_bytes / 2**20
    return 5 if mb > 64 else 10 if mb > 8 else 20
