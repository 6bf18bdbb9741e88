"""torch.compile(fullgraph=True) of the public functions: no graph breaks (so no host syncs), and
the same values and gradients as eager."""

import pytest
import torch

import fused_wloss


def _compare_compiled(fn, x, *rest):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    eager = fn(x1, *rest)
    got = compiled(x2, *rest)
    torch.testing.assert_close(got, eager)
    (g1,) = torch.autograd.grad(eager.sum(), x1)
    (g2,) = torch.autograd.grad(got.sum(), x2)
    torch.testing.assert_close(g2, g1)


@pytest.mark.parametrize("kwargs", [
    {},
    {"class_weighting": "inverse", "reduction": "sample_mean"},
    {"class_weighting": fused_wloss.BatchWeighting("effective_number"), "label_smoothing": 0.1},
    {"weight": "static", "reduction": "none"},
], ids=["plain", "inverse-sample_mean", "effective-smoothing", "static-none"])
def test_cross_entropy_compiles_fullgraph(kwargs):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 7, 3, generator=gen)
    y = torch.randint(0, 7, (32, 3), generator=gen)
    y[0] = -100
    kwargs = dict(kwargs)
    if kwargs.get("weight") == "static":
        kwargs["weight"] = torch.rand(7, generator=gen)
    _compare_compiled(lambda x, y: fused_wloss.cross_entropy(x, y, **kwargs), x, y)


@pytest.mark.parametrize("class_weighting", [None, "inverse", "balanced"])
def test_bce_compiles_fullgraph(class_weighting):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, generator=gen)
    t = (torch.rand(32, 5, generator=gen) < 0.3).float()
    _compare_compiled(
        lambda x, t: fused_wloss.binary_cross_entropy_with_logits(x, t, class_weighting=class_weighting), x, t
    )


@pytest.mark.parametrize("loss", ["ce", "ce-focal", "bce", "bce-focal", "module"])
def test_dynamic_shapes_compile_fullgraph(loss):
    """torch.compile(dynamic=True): batch sizes as symbols, the Python float options (gamma,
    smoothing) checked without math.isfinite, which such a trace cannot take; two batch sizes share
    one graph and match eager."""
    gen = torch.Generator().manual_seed(4)
    fns = {
        "ce": lambda x, y: fused_wloss.cross_entropy(x, y, class_weighting="inverse", label_smoothing=0.1),
        "ce-focal": lambda x, y: fused_wloss.cross_entropy(x, y, gamma=2.0, weight=torch.ones(6)),
        "bce": lambda x, y: fused_wloss.binary_cross_entropy_with_logits(
            x, y, class_weighting=fused_wloss.BatchWeighting("inverse", smoothing=0.5)),
        "bce-focal": lambda x, y: fused_wloss.binary_cross_entropy_with_logits(x, y, gamma=1.5, alpha=0.25),
        "module": fused_wloss.CrossEntropyLoss(class_weighting="inverse_sqrt"),
    }
    fn = fns[loss]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (12, 20):
        x = torch.randn(n, 6, generator=gen)
        y = (torch.rand(n, 6, generator=gen) < 0.3).float() if loss.startswith("bce") else torch.randint(0, 6, (n,), generator=gen)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager, got = fn(x1, y), compiled(x2, y)
        torch.testing.assert_close(got, eager)
        torch.testing.assert_close(torch.autograd.grad(got, x2)[0], torch.autograd.grad(eager, x1)[0])


def test_module_compiles_fullgraph():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    loss = fused_wloss.CrossEntropyLoss(class_weighting="inverse")
    _compare_compiled(lambda x, y: loss(x, y), x, y)


def test_inductor_training_step_with_dynamic_weights():
    """The default backend (inductor) around the custom operators: a linear layer and the fused loss
    with batch weights in one full graph, whose backward AOTAutograd compiles too."""
    gen = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(8, 5)
    x = torch.randn(64, 8, generator=gen)
    y = torch.randint(0, 5, (64,), generator=gen)
    criterion = fused_wloss.CrossEntropyLoss(class_weighting="inverse", reduction="sample_mean")

    def loss_fn(x, y):
        return criterion(layer(x), y)

    torch._dynamo.reset()
    expected = loss_fn(x, y)
    expected.backward()
    expected_grad = layer.weight.grad.clone()
    layer.zero_grad()
    got = torch.compile(loss_fn, fullgraph=True)(x, y)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(layer.weight.grad, expected_grad)


def test_compiled_autograd_traces_the_eager_backward():
    """Compiled autograd traces the backward of an eager call (whose forward ran outside
    torch.compile, through ops._EagerCrossEntropy / _EagerBce) with fullgraph=True: their backward
    must call the operator through the dispatcher there, not below the autograd key."""
    from torch._dynamo import compiled_autograd

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(32, 7, generator=gen, requires_grad=True)
    t = torch.randint(0, 7, (32,), generator=gen)
    y = (torch.rand(32, 7, generator=gen) < 0.3).float()

    def step():
        x.grad = None
        loss = fused_wloss.cross_entropy(x, t, class_weighting="inverse") + fused_wloss.binary_cross_entropy_with_logits(
            x, y, class_weighting="balanced"
        )
        loss.backward()
        return x.grad.clone()

    want = step()
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        got = step()
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---- torch.func --------------------------------------------------------------------------------

def _func_cases():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 5, (6,), generator=gen)
    q = torch.softmax(torch.randn(6, 5, generator=gen, dtype=torch.float64), -1)
    y = (torch.rand(6, 5, generator=gen) < 0.3).double()
    w = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    return x, {
        "ce": (lambda v: fused_wloss.cross_entropy(v, t, weight=w, label_smoothing=0.1, class_weighting="inverse"), t),
        "ce-soft": (lambda v: fused_wloss.cross_entropy(v, q, label_smoothing=0.1), q),
        "bce": (lambda v: fused_wloss.binary_cross_entropy_with_logits(v, y, class_weighting="balanced", gamma=2.0), y),
    }


@pytest.mark.parametrize("case", ["ce", "ce-soft", "bce"])
def test_torch_func_grad_and_jacrev(case):
    """torch.func transforms, which the operators' torch.library autograd formulas do not support,
    take the reference (plain torch) and give autograd's gradient and Jacobian."""
    x, cases = _func_cases()
    fn, _ = cases[case]
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(fn(xr), xr)
    torch.testing.assert_close(torch.func.grad(fn)(x), want, rtol=1e-12, atol=1e-14)
    jac = torch.func.jacrev(fn)(x)
    torch.testing.assert_close(jac, want, rtol=1e-12, atol=1e-14)


def test_torch_func_per_sample_gradients():
    """vmap(grad(...)): per-sample gradients of the loss (the Opacus-style recipe), as torch's."""
    x, _ = _func_cases()
    t = torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(1))
    w = torch.rand(5, dtype=torch.float64) + 0.5

    def per_sample(loss):
        return torch.func.vmap(torch.func.grad(lambda v, tt: loss(v[None], tt[None], weight=w, label_smoothing=0.1)))(x, t)

    torch.testing.assert_close(per_sample(fused_wloss.cross_entropy), per_sample(torch.nn.functional.cross_entropy))
    W = torch.randn(5, 3, dtype=torch.float64)
    h = torch.randn(6, 3, dtype=torch.float64)
    got = torch.func.grad(lambda m: fused_wloss.linear_cross_entropy(h, m, t))(W)
    Wr = W.clone().requires_grad_()
    (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ Wr.T, t), Wr)
    torch.testing.assert_close(got, want)
