"""Benchmark cases and the implementations compared on them.

A case is a loss ("ce" or "bce"), a logits shape, a weighting and a dtype:

- ``static``: fixed class weights (torch's ``weight=``);
- ``dynamic``: class weights from this batch's own labels, ``1 / (count + 1)``, with the sample mean
  (the seed recipe; for BCE, per-label counts over the batch);
- ``sample``: one weight per sample (per element of the unreduced loss), then the sample mean;
- ``soft`` (cross-entropy only): probability targets (a softmax of random logits, as distillation
  gives them), with static class weights and label smoothing 0.1;
- ``focal``: the focal loss with gamma 2 (for BCE the sigmoid focal loss with alpha 0.25, as
  ``torchvision.ops.sigmoid_focal_loss`` defines it), against the torch code that computes it.

A ``-amp`` case (float16/bfloat16 only) runs every implementation under ``torch.autocast``, as a
mixed-precision training step does: torch then computes its losses from a float32 copy of the
logits, fused_wloss from the half-precision logits themselves; both return a float32 loss. BCE's
targets are float32 there, as a data loader gives them.

Every implementation of a case computes the same number from the same inputs; the driver checks
that before timing anything.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import fused_wloss
from fused_wloss import reference

WEIGHTINGS = ("static", "dynamic", "sample", "soft", "focal")
SOFT_SMOOTHING = 0.1
FOCAL_GAMMA = 2.0
FOCAL_ALPHA = 0.25  # BCE only
DTYPE_TAGS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str  # "ce" or "bce"
    shape: Tuple[int, ...]
    weighting: str  # one of WEIGHTINGS
    dtype: str = "float32"
    amp: bool = False  # every implementation under torch.autocast (half-precision dtypes only)

    def __post_init__(self):
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"Case.loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Case.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.weighting == "soft" and self.loss != "ce":
            raise ValueError("Case.weighting 'soft' (probability targets) is a cross-entropy case")
        if self.dtype not in DTYPE_TAGS:
            raise ValueError(f"Case.dtype must be one of {tuple(DTYPE_TAGS)}, got {self.dtype!r}")
        if self.amp and self.dtype not in ("float16", "bfloat16"):
            raise ValueError(f"Case.amp needs a float16 or bfloat16 dtype, got {self.dtype!r}")

    @classmethod
    def parse(cls, name: str) -> "Case":
        """The inverse of ``name``: ``ce-8192x1000-dynamic-f32`` (the dtype tag may be left out),
        ``ce-8192x1000-static-bf16-amp`` under autocast."""
        parts = name.split("-")
        amp = len(parts) == 5 and parts[-1] == "amp"
        if amp:
            parts = parts[:-1]
        if len(parts) == 3:
            parts.append("f32")
        tags = {v: k for k, v in DTYPE_TAGS.items()}
        try:
            loss, shape, weighting, tag = parts
            dims = tuple(int(d) for d in shape.split("x"))
        except ValueError:
            raise ValueError(f"a case is named loss-shape-weighting[-dtype][-amp], e.g. ce-8192x1000-dynamic-f32; "
                             f"got {name!r}") from None
        if tag not in tags:
            raise ValueError(f"the dtype of case {name!r} must be one of {sorted(tags)}, got {tag!r}")
        if len(dims) < (2 if loss == "ce" else 1) or min(dims) < 1:
            raise ValueError(f"case {name!r}: shape {shape!r} needs positive sizes, (N, C, ...) for ce")
        return cls(loss, dims, weighting, tags[tag], amp)

    @property
    def name(self) -> str:
        amp = "-amp" if self.amp else ""
        return f"{self.loss}-{'x'.join(map(str, self.shape))}-{self.weighting}-{DTYPE_TAGS[self.dtype]}{amp}"

    @property
    def num_classes(self) -> int:
        return self.shape[1] if self.loss == "ce" else self.shape[-1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def logits_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()

    def make_inputs(self, device, seed: int = 0) -> "Inputs":
        """Logits ~ 2 N(0, 1); imbalanced labels (class k drawn with weight 1 / (k + 1) for CE, label l
        positive with a rate from 2% to 50% for BCE); weights in [0.5, 1.5)."""
        gen = torch.Generator().manual_seed(seed)
        dtype = self.torch_dtype
        x = torch.randn(self.shape, generator=gen).mul_(2).to(device=device, dtype=dtype)
        c = self.num_classes
        if self.loss == "ce" and self.weighting == "soft":
            tshape = self.shape[:1] + self.shape[2:]
            y = torch.softmax(torch.randn(self.shape, generator=gen), dim=1).to(device=device, dtype=dtype)
            sshape = tshape
        elif self.loss == "ce":
            tshape = self.shape[:1] + self.shape[2:]
            p = 1.0 / torch.arange(1, c + 1, dtype=torch.float64)
            y = torch.multinomial(p, math.prod(tshape), replacement=True, generator=gen)
            y = y.reshape(tshape).to(device)
            sshape = tshape
        else:
            rate = torch.linspace(0.02, 0.5, c)
            ydtype = torch.float32 if self.amp else dtype  # a data loader's targets, under autocast
            y = (torch.rand(self.shape, generator=gen) < rate).to(device=device, dtype=ydtype)
            sshape = self.shape[:-1]
        w = (torch.rand(c, generator=gen) + 0.5).to(device=device, dtype=dtype)
        s = (torch.rand(sshape, generator=gen) + 0.5).to(device=device, dtype=dtype)
        return Inputs(x, y, w, s)


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor  # logits
    y: torch.Tensor  # class indices (CE) or multi-label targets (BCE)
    w: torch.Tensor  # static class weights, shape (C,)
    s: torch.Tensor  # per-sample weights, the shape of the unreduced loss (CE) or x.shape[:-1] (BCE)


@dataclasses.dataclass
class Impl:
    """One way of computing a case's loss: ``fn(x, y, w, s) -> scalar``."""

    name: str
    fn: Callable
    # writes into its input logits (Liger stores the gradient there): every call gets a fresh copy
    destructive: bool = False


# -- the torch code users write today ---------------------------------------------------------------
# "torch": torch's own function with its options; "recipe": reduction="none", gathered weights and
# .mean(), with torch.bincount counts for the dynamic case. torch.compile gets the same code, except
# that bincount (a data-dependent output size and a host sync) is replaced by a fixed-size scatter_add_
# count, which it can trace.

def _counts_bincount(y, c):
    return torch.bincount(y.flatten(), minlength=c).float()


def _counts_traceable(y, c):
    counts = torch.zeros(c, device=y.device, dtype=torch.float32)
    return counts.scatter_add_(0, y.flatten(), torch.ones(y.numel(), device=y.device, dtype=torch.float32))


def _ce_torch(weighting, count):
    if weighting == "soft":
        return lambda x, y, w, s: F.cross_entropy(x, y, weight=w, label_smoothing=SOFT_SMOOTHING)
    if weighting == "static":
        return lambda x, y, w, s: F.cross_entropy(x, y, weight=w)
    if weighting == "focal":
        return None  # torch has no focal cross-entropy: the recipe is what users write
    if weighting == "dynamic":
        def ce_dynamic_torch(x, y, w, s):
            cw = 1.0 / (count(y, x.shape[1]) + 1.0)
            # sum of the weighted losses over the number of samples: torch's weight=, reduction="sum"
            return F.cross_entropy(x, y, weight=cw.to(x.dtype), reduction="sum") / y.numel()
        return ce_dynamic_torch
    return None  # F.cross_entropy has no per-sample weight: the recipe is what users write


def _ce_recipe(weighting, count):
    if weighting == "soft":
        def ce_soft_recipe(x, y, w, s):
            q = y * (1.0 - SOFT_SMOOTHING) + SOFT_SMOOTHING / x.shape[1]
            return -(F.log_softmax(x, dim=1) * w * q).sum(dim=1).mean()
        return ce_soft_recipe
    if weighting == "static":
        def ce_static_recipe(x, y, w, s):
            wy = w[y]
            return (F.cross_entropy(x, y, reduction="none") * wy).sum() / wy.sum()
        return ce_static_recipe
    if weighting == "focal":
        def ce_focal_recipe(x, y, w, s):
            logp_t = F.log_softmax(x, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
            return (-(1.0 - logp_t.exp()) ** FOCAL_GAMMA * logp_t).mean()
        return ce_focal_recipe
    if weighting == "dynamic":
        def ce_dynamic_recipe(x, y, w, s):
            cw = 1.0 / (count(y, x.shape[1]) + 1.0)
            return (F.cross_entropy(x, y, reduction="none") * cw[y]).mean()
        return ce_dynamic_recipe

    def ce_sample_recipe(x, y, w, s):
        return (F.cross_entropy(x, y, reduction="none") * s).mean()
    return ce_sample_recipe


def _label_counts(y):
    return y.flatten(0, -2).sum(0, dtype=torch.float32) if y.dim() > 1 else y.sum(dtype=torch.float32)


def _bce_focal(x, y):
    """torchvision.ops.sigmoid_focal_loss's computation (reduction="mean"), in torch ops."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** FOCAL_GAMMA
    return ((FOCAL_ALPHA * y + (1 - FOCAL_ALPHA) * (1 - y)) * loss).mean()


def _bce_torch(weighting):
    if weighting == "focal":
        return lambda x, y, w, s: _bce_focal(x, y)
    if weighting == "static":
        return lambda x, y, w, s: F.binary_cross_entropy_with_logits(x, y, weight=w)
    if weighting == "dynamic":
        return lambda x, y, w, s: F.binary_cross_entropy_with_logits(
            x, y, weight=(1.0 / (_label_counts(y) + 1.0)).to(x.dtype))
    return lambda x, y, w, s: F.binary_cross_entropy_with_logits(x, y, weight=s.unsqueeze(-1))


def _bce_recipe(weighting):
    if weighting == "focal":
        return None  # torch's code (torchvision's) is the recipe
    def bce_recipe(x, y, w, s):
        loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        if weighting == "static":
            scale = w
        elif weighting == "dynamic":
            scale = 1.0 / (_label_counts(y) + 1.0)
        else:
            scale = s.unsqueeze(-1)
        return (loss * scale).mean()
    return bce_recipe


def _fused(lib, loss, weighting):
    """fused_wloss (or its reference, which has the same signatures) for a case."""
    if loss == "ce":
        return {
            "static": lambda x, y, w, s: lib.cross_entropy(x, y, weight=w),
            "dynamic": lambda x, y, w, s: lib.cross_entropy(
                x, y, class_weighting="inverse", reduction="sample_mean"),
            "sample": lambda x, y, w, s: lib.cross_entropy(x, y, sample_weight=s, reduction="sample_mean"),
            "soft": lambda x, y, w, s: lib.cross_entropy(x, y, weight=w, label_smoothing=SOFT_SMOOTHING),
            "focal": lambda x, y, w, s: lib.cross_entropy(x, y, gamma=FOCAL_GAMMA),
        }[weighting]
    return {
        "static": lambda x, y, w, s: lib.binary_cross_entropy_with_logits(x, y, weight=w),
        "dynamic": lambda x, y, w, s: lib.binary_cross_entropy_with_logits(x, y, class_weighting="inverse"),
        "sample": lambda x, y, w, s: lib.binary_cross_entropy_with_logits(x, y, sample_weight=s),
        "focal": lambda x, y, w, s: lib.binary_cross_entropy_with_logits(x, y, gamma=FOCAL_GAMMA, alpha=FOCAL_ALPHA),
    }[weighting]


# -- Liger-Kernel (CUDA only, optional) --------------------------------------------------------------

def liger_cross_entropy() -> Tuple[Optional[Callable], str]:
    """Liger-Kernel's functional cross entropy and a note on what was found."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as fn
    except Exception as e:  # ImportError, or a Triton that does not load
        return None, f"Liger-Kernel not importable ({type(e).__name__}: {str(e)[:120]}); skipped"
    try:
        import liger_kernel
        version = getattr(liger_kernel, "__version__", "?")
    except Exception:
        version = "?"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "weight" not in params:
        return None, f"Liger-Kernel {version}: its cross entropy takes no class weight; skipped"
    return fn, f"Liger-Kernel {version}"


def _liger(fn, weighting, count):
    if weighting == "static":
        return lambda x, y, w, s: fn(x, y, weight=w)
    if weighting == "dynamic":
        def liger_dynamic(x, y, w, s):
            cw = 1.0 / (count(y, x.shape[1]) + 1.0)
            return fn(x, y, weight=cw.to(x.dtype), reduction="sum") / y.numel()
        return liger_dynamic
    return lambda x, y, w, s: (fn(x, y, reduction="none") * s).mean()


# -- the implementations of a case ------------------------------------------------------------------

def _compile(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _under_autocast(fn, device, dtype):
    """``fn`` run inside ``torch.autocast`` (a compiled ``fn`` gets it inside the compiled region)."""
    def amp(x, y, w, s):
        with torch.autocast(device.type, dtype=dtype):
            return fn(x, y, w, s)
    amp.__name__ = f"amp_{getattr(fn, '__name__', 'fn')}"
    return amp


def implementations(case: Case, device: torch.device, compile_mode: str = "all",
                    liger: Optional[Callable] = None) -> Dict[str, Impl]:
    """Every implementation of ``case``, fused_wloss first.

    ``compile_mode``: "all" (torch.compile of both torch codes), "one" (of the recipe only, the code
    torch.compile users would write for the weighting; for static weights torch's own function), or
    "none".
    """
    if compile_mode not in ("all", "one", "none"):
        raise ValueError(f"compile_mode must be 'all', 'one' or 'none', got {compile_mode!r}")
    impls = {
        "fused_wloss": Impl("fused_wloss", _fused(fused_wloss, case.loss, case.weighting)),
        "reference": Impl("reference", _fused(reference, case.loss, case.weighting)),
    }
    if case.loss == "ce":
        eager = {"torch": _ce_torch(case.weighting, _counts_bincount),
                 "recipe": _ce_recipe(case.weighting, _counts_bincount)}
        traceable = {"torch": _ce_torch(case.weighting, _counts_traceable),
                     "recipe": _ce_recipe(case.weighting, _counts_traceable)}
    else:
        eager = traceable = {"torch": _bce_torch(case.weighting), "recipe": _bce_recipe(case.weighting)}
    for name, fn in eager.items():
        if fn is not None:
            impls[name] = Impl(name, fn)
    compiled = []
    if compile_mode == "all":
        compiled = [n for n in ("torch", "recipe") if traceable[n] is not None]
    elif compile_mode == "one":
        one = "torch" if case.weighting == "static" or traceable["recipe"] is None else "recipe"
        compiled = [one] if traceable[one] is not None else []
    for name in compiled:
        fn = traceable[name]
        if case.amp:
            fn = _under_autocast(fn, device, case.torch_dtype)
        impls[f"compile({name})"] = Impl(f"compile({name})", _compile(fn))
    if case.amp:
        for name, impl in impls.items():
            if not name.startswith("compile("):
                impl.fn = _under_autocast(impl.fn, device, case.torch_dtype)
    if (liger is not None and device.type == "cuda" and case.loss == "ce" and len(case.shape) == 2 and not case.amp
            and case.weighting not in ("soft", "focal")):  # Liger takes no probability targets, no focal loss
        # Liger writes the gradient into the logits during the forward: it gets a fresh copy per call
        impls["liger"] = Impl("liger", _liger(liger, case.weighting, _counts_traceable), destructive=True)
    return impls


BASELINE_ORDER = ["reference", "torch", "recipe", "compile(torch)", "compile(recipe)", "liger"]


# -- the case sets ----------------------------------------------------------------------------------

def _cases(specs, weightings, dtypes) -> List[Case]:
    return [Case(loss, shape, wt, dt) for dt in dtypes for loss, shape in specs for wt in weightings
            if wt != "soft" or (loss == "ce" and len(shape) == 2)]


# CPU, --quick (`make bench`, about 3 minutes on a 2-core machine): CE over three class counts (the
# "time vs C" plot) with each weighting, the segmentation layout, BCE, and bfloat16.
CPU_QUICK = (
    _cases([("ce", (65536, 10)), ("ce", (8192, 1000)), ("ce", (1024, 32000))], ["static", "dynamic"], ["float32"])
    + [Case("ce", (8192, 1000), "sample"), Case("ce", (8192, 1000), "soft"), Case("ce", (1024, 32000), "soft"),
       Case("ce", (4, 19, 256, 256), "dynamic"),
       Case("bce", (65536, 10), "static"), Case("bce", (8192, 1000), "dynamic"), Case("bce", (8192, 1000), "focal"),
       Case("ce", (8192, 1000), "static", "bfloat16"), Case("ce", (1024, 32000), "dynamic", "bfloat16"),
       Case("ce", (8192, 1000), "static", "bfloat16", amp=True), Case("bce", (8192, 1000), "dynamic", "bfloat16", amp=True)]
)

# CPU, --full: the shapes of the CPU-kernel issue, every weighting, float32 and bfloat16.
CPU_FULL = _cases(
    [("ce", (65536, 10)), ("ce", (8192, 1000)), ("ce", (4096, 32000)), ("ce", (512, 128000)),
     ("ce", (16, 19, 256, 256)), ("bce", (65536, 10)), ("bce", (8192, 1000))],
    WEIGHTINGS, ["float32", "bfloat16"])

# CUDA, --full: the shapes of the CUDA-kernel issue, float32, bfloat16 and float16.
CUDA_FULL = _cases(
    [("ce", (65536, 10)), ("ce", (16384, 1000)), ("ce", (8192, 32000)), ("ce", (4096, 128000)),
     ("ce", (2048, 256000)), ("ce", (32, 19, 512, 512)), ("bce", (65536, 10)), ("bce", (16384, 1000))],
    WEIGHTINGS, ["float32", "bfloat16", "float16"])

CUDA_QUICK = (
    _cases([("ce", (65536, 10)), ("ce", (16384, 1000)), ("ce", (8192, 32000)), ("ce", (2048, 256000))],
           ["static", "dynamic"], ["bfloat16", "float32"])
    + [Case("ce", (16384, 1000), "sample", "bfloat16"), Case("ce", (16384, 1000), "soft", "bfloat16"),
       # a row cut into slices (8 rows of 256k classes) and the K-dim pixel grid in both vector widths
       Case("ce", (8, 256000), "static", "bfloat16"),
       Case("ce", (32, 19, 512, 512), "dynamic", "bfloat16"), Case("ce", (32, 19, 512, 512), "static", "float32"),
       Case("bce", (16384, 1000), "dynamic", "bfloat16"),
       Case("ce", (8192, 32000), "static", "bfloat16", amp=True), Case("bce", (16384, 1000), "dynamic", "bfloat16", amp=True)]
)


def case_set(device_type: str, full: bool) -> List[Case]:
    if device_type == "cuda":
        return list(CUDA_FULL if full else CUDA_QUICK)
    return list(CPU_FULL if full else CPU_QUICK)
