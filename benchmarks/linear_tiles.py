"""A measured prototype, not a product path: the fused linear cross-entropy cut by classes.

``python -m benchmarks.linear_tiles [--shape N,H,C] [--tile CLASSES] [--repeats K]``

fused_wloss.linear_cross_entropy cuts the rows: each chunk's logits come from one matmul, and each
chunk's three matmuls (logits, input gradient, weight-gradient update) stream the whole C x H
weight. With few rows a chunk (torch's chunked path takes 32 at (2048, 1024, 128256)) those
matmuls are thin and run at half the speed of square ones here, so holding torch's peak memory
costs us our lead (README, "CPU: fused linear + cross-entropy, peak memory").

Cutting the classes instead keeps every matmul square at the same memory: a first pass over
class tiles forms each row's log-sum-exp (one matmul a tile), a second pass recomputes each
tile's logits, turns them into their gradient and multiplies it out (three matmuls a tile, the
weight gradient of a tile written once). Four matmuls against three, but square ones.

This module times that design in plain torch ops for a weighted "mean" cross-entropy (no
smoothing, focal, sample weights or ignored targets), next to torch's chunked path and
fused_wloss's, in one process, after checking the loss and gradients against torch's. A product
version would form each tile's gradient with the kernels and cover every option.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fused_wloss


def tiled_linear_cross_entropy(x, w, y, class_weight, tile):
    """Loss, input gradient and weight gradient of ``F.cross_entropy(x @ w.T, y,
    weight=class_weight)`` ("mean"), a tile of ``tile`` classes at a time: at most one
    (N, tile) block of logits alive."""
    n, c = x.shape[0], w.shape[0]
    lse = torch.full((n,), -float("inf"), dtype=x.dtype)
    for c0 in range(0, c, tile):
        lse = torch.logaddexp(lse, torch.logsumexp(x @ w[c0:c0 + tile].t(), 1))
    w_y = class_weight[y]
    norm = w_y.sum()
    z_y = (x * w[y]).sum(1)  # the target logits, without the tile that holds them
    loss = (w_y * (lse - z_y)).sum() / norm
    coef = w_y / norm  # d loss / d logit[i, c] = coef_i (softmax[i, c] - [c == y_i])
    grad_x = torch.zeros_like(x)
    grad_w = torch.empty_like(w)
    rows = torch.arange(n)
    for c0 in range(0, c, tile):
        w_tile = w[c0:c0 + tile]
        g = x @ w_tile.t()
        g.sub_(lse[:, None]).exp_().mul_(coef[:, None])
        r = rows[(y >= c0) & (y < c0 + g.shape[1])]
        g[r, y[r] - c0] -= coef[r]
        torch.mm(g.t(), x, out=grad_w[c0:c0 + tile])
        grad_x.addmm_(g, w_tile)
    return loss, grad_x, grad_w


def _torch_chunked(x, w, y, class_weight):
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.linear_cross_entropy(xl, wl, y, weight=class_weight,
                                  options=torch.nn.LinearCrossEntropyOptions())
    loss.backward()
    return loss.detach(), xl.grad, wl.grad


def _ours(x, w, y, class_weight):
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_wloss.linear_cross_entropy(xl, wl, y, weight=class_weight)
    loss.backward()
    return loss.detach(), xl.grad, wl.grad


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="2048,1024,128256", help="N,H,C")
    p.add_argument("--tile", type=int, default=2048, help="classes per tile")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    n, h, c = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    x, w = torch.randn(n, h), torch.randn(c, h) * 0.02
    y, class_weight = torch.randint(0, c, (n,)), torch.rand(c) + 0.5
    want = F.cross_entropy(x.double() @ w.double().t(), y, weight=class_weight.double())
    got = tiled_linear_cross_entropy(x, w, y, class_weight, args.tile)
    base = _torch_chunked(x, w, y, class_weight)
    print(f"loss: tiled {float(got[0]):.7f}, torch chunked {float(base[0]):.7f}, float64 {float(want):.7f}; "
          f"largest gradient differences to torch's: input {float((got[1] - base[1]).abs().max()):.2e}, "
          f"weight {float((got[2] - base[2]).abs().max()):.2e}")
    print(f"({n}, {h}, {c}) float32, {torch.get_num_threads()} threads; tiles of {args.tile} classes "
          f"({n * args.tile * 4 / 2**20:.1f} MiB of logits)")
    impls = {"tiled": lambda: tiled_linear_cross_entropy(x, w, y, class_weight, args.tile),
             "torch chunked": lambda: _torch_chunked(x, w, y, class_weight),
             "fused_wloss": lambda: _ours(x, w, y, class_weight)}
    times = {k: [] for k in impls}
    for _ in range(args.repeats):  # interleaved, so that the machine's drift touches each alike
        for name, fn in impls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tiled = sorted(times["tiled"])[len(times["tiled"]) // 2]
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        print(f"  {name:14s} median {med:8.3f} s  ({med / tiled:.2f}x tiled's time)")


if __name__ == "__main__":
    main()
