"""Run a loss and its backward in one call, for value-and-gradient comparisons."""

from __future__ import annotations

import torch


def value_and_grad(fn, sample, seed: int = 1234):
    """``fn(*sample.args, **sample.kwargs)`` and the gradient of its input, on fresh leaves.

    The backward uses a fixed random ``grad_output`` so that "none" reductions are checked with a
    non-uniform upstream gradient.
    """
    s = sample.clone(requires_grad=True)
    out = fn(*s.args, **s.kwargs)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.rand(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device) + 0.5
    (grad,) = torch.autograd.grad(out, s.args[0], grad_out)
    return out.detach(), grad


def assert_close(actual, expected, dtype, what=""):
    tol = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}.get(dtype, (2e-2, 2e-3))
    torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1], equal_nan=True, msg=lambda m: f"{what}: {m}")
