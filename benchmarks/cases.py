"""Benchmark cases and the implementations compared on them.

A case is a loss (CE or BCE), a logits shape and a weighting ("static": torch's ``weight``;
"dynamic": the seed recipe, weights from this batch's counts with the sample mean). Every
implementation of a case computes the same number, which the driver checks before timing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import reference


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str  # "ce" or "bce"
    shape: tuple
    weighting: str  # "static" or "dynamic"

    @property
    def name(self) -> str:
        return f"{self.loss}-{'x'.join(map(str, self.shape))}-{self.weighting}"

    @property
    def num_classes(self) -> int:
        return self.shape[1] if self.loss == "ce" else self.shape[-1]

    def make_inputs(self, device, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.shape, generator=gen).mul_(2).to(device=device, dtype=dtype)
        c = self.num_classes
        if self.loss == "ce":
            tshape = self.shape[:1] + self.shape[2:]
            # imbalanced: class k drawn with weight 1 / (k + 1)
            p = 1.0 / torch.arange(1, c + 1, dtype=torch.float64)
            y = torch.multinomial(p, int(torch.tensor(tshape).prod()), replacement=True, generator=gen)
            y = y.reshape(tshape).to(device)
        else:
            rate = torch.linspace(0.02, 0.5, c)
            y = (torch.rand(self.shape, generator=gen) < rate).to(device=device, dtype=dtype)
        w = (torch.rand(c, generator=gen) + 0.5).to(device=device, dtype=dtype)
        return x, y, w


# -- the torch code users write today -------------------------------------------------------------

def torch_ce_static(x, y, w):
    return F.cross_entropy(x, y, weight=w)


def torch_ce_dynamic(x, y, w):
    counts = torch.bincount(y.flatten(), minlength=x.shape[1])
    cw = 1.0 / (counts + 1.0)
    return (F.cross_entropy(x, y, reduction="none") * cw[y]).mean()


def torch_ce_dynamic_nosync(x, y, w):
    """The seed recipe with a fixed-size count (scatter_add_) so that torch.compile can trace it."""
    counts = torch.zeros(x.shape[1], device=x.device, dtype=torch.float32)
    counts.scatter_add_(0, y.flatten(), torch.ones(y.numel(), device=x.device, dtype=torch.float32))
    cw = 1.0 / (counts + 1.0)
    return (F.cross_entropy(x, y, reduction="none") * cw[y]).mean()


def torch_bce_static(x, y, w):
    return F.binary_cross_entropy_with_logits(x, y, weight=w)


def torch_bce_dynamic(x, y, w):
    label_w = 1.0 / (y.sum(dim=0) + 1.0)
    return (F.binary_cross_entropy_with_logits(x, y, reduction="none") * label_w).mean()


def fused_call(lib) -> Dict[str, Callable]:
    return {
        ("ce", "static"): lambda x, y, w: lib.cross_entropy(x, y, weight=w),
        ("ce", "dynamic"): lambda x, y, w: lib.cross_entropy(x, y, class_weighting="inverse", reduction="sample_mean"),
        ("bce", "static"): lambda x, y, w: lib.binary_cross_entropy_with_logits(x, y, weight=w),
        ("bce", "dynamic"): lambda x, y, w: lib.binary_cross_entropy_with_logits(x, y, class_weighting="inverse"),
    }


TORCH_EAGER = {
    ("ce", "static"): torch_ce_static,
    ("ce", "dynamic"): torch_ce_dynamic,
    ("bce", "static"): torch_bce_static,
    ("bce", "dynamic"): torch_bce_dynamic,
}
# what torch.compile is given: the same code, with the count written so that it can be traced
TORCH_COMPILABLE = {**TORCH_EAGER, ("ce", "dynamic"): torch_ce_dynamic_nosync}


def implementations(case: Case, with_compile: bool) -> Dict[str, Callable]:
    key = (case.loss, case.weighting)
    impls = {
        "fused_wloss": fused_call(fused_wloss)[key],
        "reference": fused_call(reference)[key],
        "torch": TORCH_EAGER[key],
    }
    if with_compile:
        impls["torch.compile"] = torch.compile(TORCH_COMPILABLE[key], fullgraph=True, dynamic=False)
    return impls


QUICK_CASES = [
    Case("ce", (65536, 10), "static"), Case("ce", (65536, 10), "dynamic"),
    Case("ce", (8192, 1000), "static"), Case("ce", (8192, 1000), "dynamic"),
    Case("ce", (1024, 32000), "static"), Case("ce", (1024, 32000), "dynamic"),
    Case("ce", (4, 19, 256, 256), "static"), Case("ce", (4, 19, 256, 256), "dynamic"),
    Case("bce", (65536, 10), "static"), Case("bce", (8192, 1000), "dynamic"),
]

FULL_CASES = [
    Case(loss, shape, weighting)
    for loss, shapes in (
        ("ce", [(65536, 10), (8192, 1000), (4096, 32000), (512, 128000), (16, 19, 256, 256)]),
        ("bce", [(65536, 10), (8192, 1000)]),
    )
    for shape in shapes
    for weighting in ("static", "dynamic")
]
