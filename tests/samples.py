"""Sample-input generators shared by the test modules.

Each sample is a ``Sample(args, kwargs, torch_ok)``: the positional arguments and keyword
arguments of a fused_wloss call, and whether torch's own function accepts the same call (no
fused_wloss-only options), so the same sample feeds the comparison with the reference and with
torch.
"""

from __future__ import annotations

import itertools
from typing import Iterator, NamedTuple

import torch

from fused_wloss import BatchWeighting


class Sample(NamedTuple):
    name: str
    args: tuple
    kwargs: dict
    torch_ok: bool

    def clone(self, requires_grad: bool = False) -> "Sample":
        """Fresh leaf copies, so two implementations never share autograd state."""

        def fresh(v, grad):
            if not isinstance(v, torch.Tensor):
                return v
            v = v.detach().clone()
            return v.requires_grad_(grad)

        args = (fresh(self.args[0], requires_grad),) + tuple(fresh(a, False) for a in self.args[1:])
        kwargs = {k: fresh(v, False) for k, v in self.kwargs.items()}
        return Sample(self.name, args, kwargs, self.torch_ok)


CE_SHAPES = {
    "unbatched": (7,),
    "2d": (12, 7),
    "kdim1": (3, 5, 4),
    "kdim2": (2, 4, 3, 5),
}

REDUCTIONS = ("none", "sum", "mean")
SCHEMES = ("inverse", "inverse_sqrt", "effective_number")


def _index_target(shape, num_classes, gen, ignore_index=None, absent=None):
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    t = torch.randint(0, num_classes, target_shape, generator=gen)
    if absent is not None:  # make class `absent` missing from the batch
        t = torch.where(t == absent, (absent + 1) % num_classes, t)
    if ignore_index is not None and t.numel() > 1:
        mask = torch.rand(target_shape, generator=gen) < 0.3
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t


def _prob_target(shape, gen, dtype):
    class_dim = 0 if len(shape) == 1 else 1
    return torch.softmax(torch.randn(shape, generator=gen, dtype=dtype), dim=class_dim)


def cross_entropy_samples(dtype=torch.float32, device="cpu", seed=0) -> Iterator[Sample]:
    """Every combination torch supports, then the fused_wloss extras on top of some of them."""
    gen = torch.Generator().manual_seed(seed)
    for (shape_name, shape), target_kind, reduction, use_weight, smoothing, ignore in itertools.product(
        CE_SHAPES.items(), ("index", "prob"), REDUCTIONS, (False, True), (0.0, 0.25), (False, True)
    ):
        if target_kind == "prob" and ignore:
            continue  # ignore_index does not apply to probability targets
        num_classes = shape[0] if len(shape) == 1 else shape[1]
        x = torch.randn(shape, generator=gen, dtype=dtype) * 3
        if target_kind == "index":
            t = _index_target(shape, num_classes, gen, ignore_index=-100 if ignore else None)
        else:
            t = _prob_target(shape, gen, dtype)
        kwargs = {"reduction": reduction}
        if use_weight:
            kwargs["weight"] = torch.rand(num_classes, generator=gen, dtype=dtype) + 0.1
        if smoothing:
            kwargs["label_smoothing"] = smoothing
        name = f"{shape_name}-{target_kind}-{reduction}-w{int(use_weight)}-ls{smoothing}-ig{int(ignore)}"
        yield _to(Sample(name, (x, t), kwargs, True), device)

    # fused_wloss extras: sample weights, dynamic weights and sample_mean, combined with the rest.
    for (shape_name, shape), target_kind, reduction, extra in itertools.product(
        CE_SHAPES.items(), ("index", "prob"), REDUCTIONS + ("sample_mean",),
        ("sample_weight", "inverse", "inverse_sqrt", "effective_number", "all"),
    ):
        num_classes = shape[0] if len(shape) == 1 else shape[1]
        x = torch.randn(shape, generator=gen, dtype=dtype) * 3
        if target_kind == "index":
            t = _index_target(shape, num_classes, gen, ignore_index=-100, absent=0)
        else:
            t = _prob_target(shape, gen, dtype)
        loss_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
        kwargs = {"reduction": reduction}
        if extra in ("sample_weight", "all"):
            kwargs["sample_weight"] = torch.rand(loss_shape, generator=gen, dtype=dtype) + 0.05
        if extra in SCHEMES:
            kwargs["class_weighting"] = extra
        if extra == "all":
            kwargs["class_weighting"] = BatchWeighting("effective_number", beta=0.9)
            kwargs["weight"] = torch.rand(num_classes, generator=gen, dtype=dtype) + 0.1
            kwargs["label_smoothing"] = 0.1
        name = f"{shape_name}-{target_kind}-{reduction}-{extra}"
        yield _to(Sample(name, (x, t), kwargs, False), device)


BCE_SHAPES = {"0d": (), "1d": (9,), "2d": (10, 4), "3d": (3, 4, 5)}


def bce_samples(dtype=torch.float32, device="cpu", seed=0) -> Iterator[Sample]:
    gen = torch.Generator().manual_seed(seed)
    for (shape_name, shape), reduction, use_weight, use_pos, soft in itertools.product(
        BCE_SHAPES.items(), REDUCTIONS, (False, True), (False, True), (False, True)
    ):
        x = torch.randn(shape, generator=gen, dtype=dtype) * 3
        t = torch.rand(shape, generator=gen, dtype=dtype)
        if not soft:
            t = (t < 0.3).to(dtype)
        kwargs = {"reduction": reduction}
        labels = shape[-1:] if len(shape) >= 1 else ()
        if use_weight:
            kwargs["weight"] = torch.rand(shape, generator=gen, dtype=dtype) + 0.1
        if use_pos:
            kwargs["pos_weight"] = torch.rand(labels, generator=gen, dtype=dtype) * 3 + 0.1
        name = f"{shape_name}-{reduction}-w{int(use_weight)}-pw{int(use_pos)}-soft{int(soft)}"
        yield _to(Sample(name, (x, t), kwargs, True), device)

    for (shape_name, shape), reduction, extra in itertools.product(
        BCE_SHAPES.items(), REDUCTIONS + ("sample_mean",),
        ("sample_weight", "inverse", "balanced", "inverse_sqrt", "effective_number", "all"),
    ):
        x = torch.randn(shape, generator=gen, dtype=dtype) * 3
        t = (torch.rand(shape, generator=gen, dtype=dtype) < 0.3).to(dtype)
        rows = shape[:-1] if len(shape) >= 2 else shape
        kwargs = {"reduction": reduction}
        if extra in ("sample_weight", "all"):
            kwargs["sample_weight"] = torch.rand(rows, generator=gen, dtype=dtype) + 0.05
        if extra in ("inverse", "balanced", "inverse_sqrt", "effective_number"):
            kwargs["class_weighting"] = extra
        if extra == "all":
            kwargs["class_weighting"] = BatchWeighting("inverse_sqrt", smoothing=0.5, balanced=True)
            kwargs["weight"] = torch.rand(shape, generator=gen, dtype=dtype) + 0.1
            labels = shape[-1:] if len(shape) >= 1 else ()
            kwargs["pos_weight"] = torch.rand(labels, generator=gen, dtype=dtype) * 3 + 0.1
        name = f"{shape_name}-{reduction}-{extra}"
        yield _to(Sample(name, (x, t), kwargs, False), device)


def _to(sample: Sample, device) -> Sample:
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return Sample(sample.name, tuple(move(a) for a in sample.args),
                  {k: move(v) for k, v in sample.kwargs.items()}, sample.torch_ok)
