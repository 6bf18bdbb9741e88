"""BCE at large logits under large weights, and dynamic weights of counts below 0.

The element loss ``a (1 - t) softplus(x) + b t softplus(-x)`` was computed as
``a (1 - t) x + (a (1 - t) + b t) softplus(-x)``, which for a negative ``x`` cancels two products of
size ``a |x|``: at logit -1e5, target 0 and a weight of 1000 it gave 1.9 for a loss of 0. Here every
path (the reference, the CPU kernels of each instruction set, the emulated CUDA kernels, plain and
focal) is checked against the closed form in float64 at logits of +-30, +-1e4 and +-1e5 under
weights up to 1e4.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import fused_wloss
from fused_wloss import BatchWeighting, reference

from helpers import kernel_paths, serve

LOGITS = [-1e5, -1e4, -30.0, -1.5, 0.0, 2.0, 30.0, 1e4, 1e5]
WEIGHTS = [1.0, 1e3, 1e4]


PATHS = ["reference"] + kernel_paths()


@contextlib.contextmanager
def _serve(path):
    if path == "reference":
        yield reference.binary_cross_entropy_with_logits
        return
    with serve(path):
        yield fused_wloss.binary_cross_entropy_with_logits


def _softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def _expected(x, t, neg, pos, gamma, alpha):
    """Loss and d loss / dx of each element, in Python floats (float64), from the definitions."""
    losses, grads = [], []
    for xi, ti, a, b in zip(x.tolist(), t.tolist(), neg.tolist(), pos.tolist()):
        loss = a * (1 - ti) * _softplus(xi) + b * ti * _softplus(-xi)
        grad = a * (1 - ti) * _sigmoid(xi) - b * ti * _sigmoid(-xi)
        if gamma or alpha is not None:
            p, p_neg = _sigmoid(xi), _sigmoid(-xi)  # 1 - p without cancellation
            q = p * (1 - ti) + p_neg * ti
            dq = p * p_neg * (1 - 2 * ti)
            m = q**gamma if gamma else 1.0
            dm = gamma * q ** (gamma - 1) * dq if gamma and q > 0 else 0.0
            at = 1.0 if alpha is None else alpha * ti + (1 - alpha) * (1 - ti)
            loss, grad = at * m * loss, at * (dm * loss + m * grad)
        losses.append(loss)
        grads.append(grad)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("focal", [(0.0, None), (2.0, 0.25), (0.5, None)], ids=["plain", "focal", "focal-half"])
@pytest.mark.parametrize("target", [0.0, 1.0, 0.3])
def test_large_logits_under_large_weights(path, dtype, focal, target):
    gamma, alpha = focal
    # every logit under every weight pair, as one (N, 2) batch: label 0 weighted by `weight`, label
    # 1 by `pos_weight` (the same weights, in the other order)
    pairs = [(x, w) for x in LOGITS for w in WEIGHTS]
    x = torch.tensor([[v, v] for v, _ in pairs], dtype=dtype)
    weight = torch.tensor([[w, 1.0 / w] for _, w in pairs], dtype=dtype)  # per element
    pos_weight = torch.tensor([10.0, 1e4], dtype=dtype)
    t = torch.full_like(x, target)
    with _serve(path) as fn:
        xg = x.clone().requires_grad_(True)
        loss = fn(xg, t, weight=weight, pos_weight=pos_weight, reduction="none", gamma=gamma, alpha=alpha)
        (grad,) = torch.autograd.grad(loss.sum(), xg)
    neg = weight.double().flatten()
    pos = (weight.double() * pos_weight.double()).flatten()
    exp_loss, exp_grad = _expected(x.double().flatten(), t.double().flatten(), neg, pos, gamma, alpha)
    rtol = 1e-12 if dtype == torch.float64 else 4e-6
    # atol: below float32's smallest normal number; the focal factor can take a loss there
    torch.testing.assert_close(loss.double().flatten(), exp_loss, rtol=rtol, atol=1e-36)
    torch.testing.assert_close(grad.double().flatten(), exp_grad, rtol=rtol * 10, atol=1e-36)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("logit", [-1e5, -30.0])
def test_far_negative_logit_under_dynamic_weight_of_1000(path, logit):
    """The fuzzer's example: one element, target 0, BatchWeighting("inverse", smoothing=0.001)
    weights it 1 / 0.001 = 1000 (no positive label). The loss is 1000 softplus(logit)."""
    x = torch.tensor([[logit]])
    t = torch.zeros(1, 1)
    with _serve(path) as fn:
        loss = fn(x, t, class_weighting=BatchWeighting("inverse", smoothing=0.001), reduction="none")
    expected = 1000.0 * _softplus(logit)  # 0 at -1e5, 9.4e-11 at -30
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().flatten(), torch.tensor([expected], dtype=torch.float64), rtol=1e-5,
                               atol=1e-36)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scheme", ["inverse", "balanced", BatchWeighting("inverse_sqrt"),
                                    BatchWeighting("inverse", smoothing=0.5, balanced=True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dynamic_weights_of_counts_below_zero(path, scheme, dtype):
    """Targets outside [0, 1] can sum to a negative count (a label's positives, or for "balanced"
    its negatives rows - sum t). Such a count counts as 0: the weight is 1 / (0 + smoothing), finite,
    the same on every path, and the gradient is finite."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1023, generator=gen).to(dtype)
    t = torch.zeros(3, 1023)
    t[:, 0] = -1.0  # label 0: sum of t = -3
    t[:, 1] = 2.0  # label 1: sum of (1 - t) = -3
    t[:, 2:] = (torch.rand(3, 1021, generator=gen) < 0.5).float()
    t = t.to(dtype)
    with _serve(path) as fn:
        xg = x.clone().requires_grad_(True)
        loss = fn(xg, t, class_weighting=scheme, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), xg)
    weighting = scheme if isinstance(scheme, BatchWeighting) else fused_wloss._weighting.resolve_class_weighting(
        scheme, loss="binary_cross_entropy_with_logits")
    # the reference's values, with the clamped counts written out
    pos_count = t.double().sum(0).clamp(min=0)
    neg_count = (1 - t.double()).sum(0).clamp(min=0)
    pos_w = weighting.weights(pos_count)
    neg_w = weighting.weights(neg_count) if weighting.balanced else pos_w
    assert torch.isfinite(pos_w).all() and torch.isfinite(neg_w).all()
    exp_loss, exp_grad = _expected(x.double().flatten(), t.double().flatten(), neg_w.repeat(3), pos_w.repeat(3), 0.0,
                                   None)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    tol = {torch.float16: (2e-3, 1e-4), torch.float32: (2e-5, 1e-7)}[dtype]
    torch.testing.assert_close(loss.double().flatten(), exp_loss, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(grad.double().flatten(), exp_grad, rtol=tol[0], atol=tol[1])


def test_batch_weighting_clamps_negative_counts_and_keeps_nan():
    w = BatchWeighting("inverse", smoothing=1.0).weights(torch.tensor([-2.0, 0.0, 3.0, float("nan")]))
    torch.testing.assert_close(w[:3], torch.tensor([1.0, 1.0, 0.25]))
    assert torch.isnan(w[3])
