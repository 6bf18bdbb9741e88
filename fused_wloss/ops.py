"""The compiled operators seen from Python: fake kernels, autograd formulas and the thin wrappers
the public functions call.

``torch.ops.fused_wloss`` holds one forward/backward pair per loss (schemas in csrc/schemas.h). The
backward is an operator of its own, so autograd and torch.compile only ever see dispatcher ops, and
the forward saves O(N) per-row statistics for it, never an N x C tensor.

The test-only module ``fused_wloss._cuda_emu`` registers the same schemas as
``torch.ops.fused_wloss_emu`` (the CUDA kernels run on the CPU); :func:`register` gives them the same
fake kernels and autograd formulas, and :func:`use_namespace` points the wrappers below at them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

from ._weighting import BatchWeighting

REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2, "sample_mean": 3}
KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

NAMESPACE = "fused_wloss"

# The operators the wrappers call (and the backward formulas look up when they run).
_ops = torch.ops.fused_wloss


@contextlib.contextmanager
def use_namespace(name: str) -> Iterator[None]:
    """Serve the kernel path from ``torch.ops.<name>`` (a namespace :func:`register` has set up)
    for the duration of the block; the tests use it to run the emulated CUDA kernels."""
    global _ops
    before = _ops
    _ops = getattr(torch.ops, name)
    try:
        yield
    finally:
        _ops = before


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_dtype_of(loss_dtype: Optional[torch.dtype], input_dtype: torch.dtype) -> torch.dtype:
    """The forward operators' loss dtype (schemas.h): the input's, or its accumulation dtype."""
    if loss_dtype is None:
        return input_dtype
    torch._check(
        loss_dtype in (input_dtype, _acc_dtype(input_dtype)),
        lambda: f"fused_wloss: loss_dtype must be the input's dtype ({input_dtype}) or its accumulation "
        f"dtype ({_acc_dtype(input_dtype)}), got {loss_dtype}",
    )
    return loss_dtype


def _wants_grad(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.requires_grad


def _scheme_args(weighting: Optional[BatchWeighting]):
    if weighting is None:
        return 0, 1.0, 0.999, False
    return weighting.scheme_code, weighting.smoothing, weighting.beta, weighting.balanced


# ---- cross-entropy --------------------------------------------------------------------------------

def _eager_autograd(input: torch.Tensor) -> bool:
    """Whether a call that builds a graph takes the eager autograd.Function below instead of the
    formula registered with torch.library. That formula costs about 100 us of Python per forward
    and backward (filling schema defaults, redispatching through Python), as much as the kernels of
    a 65536 x 10 batch; the Function calls the same operators below the autograd key. Traced or
    transformed calls (torch.compile, torch.func, tensor subclasses) keep the registered formula,
    which is what those systems understand, and so do calls under inference_mode (with grad
    enabled inside it), where nothing may be saved for a backward."""
    return (
        type(input) is torch.Tensor
        and input.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # first: Dynamo cannot trace the two checks below
        and not torch.is_inference_mode_enabled()
        and not torch._C._are_functorch_transforms_active()
    )


def _eager_no_graph(input: torch.Tensor) -> bool:
    """Whether a call that builds no graph (evaluation, no_grad, inference_mode, or logits that do
    not require grad) calls the forward operator below the autograd key. Through the dispatcher,
    the registered formula's autograd kernel would spend about 12 us of Python per call to find
    that there is nothing to record. The same traced and transformed calls as above keep the
    dispatcher path."""
    return (
        type(input) is torch.Tensor
        and not (input.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


_below_autograd = torch._C._AutoDispatchBelowAutograd


def _eager_backward_call(op, *args):
    """The backward operator call of the eager Functions: through the dispatcher as usual under
    create_graph (the registered formula then refuses a double backward) and while compiled
    autograd traces the backward; otherwise below the autograd key, as their forward."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with _below_autograd():
        return op(*args)


def _ce_forward_fake(input, target, weight, sample_weight, ignore_index, label_smoothing, reduction, scheme, smoothing, beta,
                     gamma=0.0, loss_dtype=None):
    torch._check(input.dim() >= 1, lambda: "cross_entropy_forward: input must have at least 1 dimension")
    torch._check(target.dtype in (torch.int64, torch.int32), lambda: "cross_entropy_forward: target must be int64 or int32")
    loss_shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty(loss_shape if reduction == 0 else (), dtype=_loss_dtype_of(loss_dtype, input.dtype))
    lse = input.new_empty((2, math.prod(loss_shape)), dtype=acc)  # hi and lo parts of the lse
    has_class_weight = weight is not None or scheme != 0
    class_weight = input.new_empty((num_classes,) if has_class_weight else (0,), dtype=acc)
    return loss, lse, class_weight, input.new_empty((), dtype=acc)


def _classes_last_order(dim: int):
    return (0, *range(2, dim), 1)


def ce_grad_like(input: torch.Tensor) -> torch.Tensor:
    """An empty gradient for ``input`` laid out as cross_entropy_backward returns it (csrc/host_common.h,
    classes_last_rows): K-dim logits whose classes are innermost in memory (channels_last and the
    like) get their own layout, read and written in place by the kernels; anything else a
    contiguous tensor."""
    if input.dim() >= 3 and input.numel() > 0:
        order = _classes_last_order(input.dim())
        if input.permute(order).is_contiguous():
            back = [0] * input.dim()
            for i, d in enumerate(order):
                back[d] = i
            return input.new_empty([input.shape[d] for d in order]).permute(back)
    return input.new_empty(input.shape)


def _ce_backward_fake(grad_loss, input, target, class_weight, sample_weight, lse, norm, ignore_index, label_smoothing, reduction,
                      gamma=0.0):
    return ce_grad_like(input)


def _ce_grad_inplace_fake(input, grad_loss, target, class_weight, sample_weight, lse, norm, ignore_index,
                          label_smoothing, reduction, gamma=0.0):
    torch._check(input.dim() == 2, lambda: "cross_entropy_grad_: input must be (N, C) logits")
    return input


def _ce_setup_context(ctx, inputs, output):
    input, target, _weight, sample_weight, ignore_index, label_smoothing, reduction = inputs[:7]
    gamma = inputs[10] if len(inputs) > 10 else 0.0
    _loss, lse, class_weight, norm = output
    ctx.mark_non_differentiable(lse, class_weight, norm)
    ctx.options = (ignore_index, label_smoothing, reduction, gamma)
    ctx.num_inputs = len(inputs)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(input, target, sample_weight, lse, class_weight, norm)


def _ce_backward(ctx, grad_loss, *_unused):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise RuntimeError(
            "fused_wloss.cross_entropy_forward: gradients with respect to weight or sample_weight are "
            "not computed by the kernels; fused_wloss.cross_entropy sends such calls to the reference"
        )
    grad_input = None
    if ctx.needs_input_grad[0]:
        input, target, sample_weight, lse, class_weight, norm = ctx.saved_tensors
        grad_input = _ops.cross_entropy_backward(
            grad_loss, input, target, class_weight, sample_weight, lse, norm, *ctx.options
        )
    return (grad_input,) + (None,) * (ctx.num_inputs - 1)


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active. The operators' autograd
    formulas, registered through torch.library, do not support those transforms, so such calls go
    to the reference, which is plain torch and supports them all. False while Dynamo traces (it
    cannot trace the check; compiled code takes the operators)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def ce_supported(input, target, weight, sample_weight, prob_target: bool) -> bool:
    """Whether the kernels serve this call; the others go to the reference."""
    return not (
        functorch_active()
        or (prob_target and not prob_target_supported(input, target))
        or input.dtype not in KERNEL_DTYPES
        or _wants_grad(weight)
        or _wants_grad(sample_weight)
        or target.requires_grad
    )


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, sample_weight,
                  weighting: Optional[BatchWeighting], gamma: float = 0.0,
                  loss_dtype: Optional[torch.dtype] = None):
    """The kernel path of the public function, for calls ``ce_supported`` accepts."""
    scheme, smoothing, beta, _ = _scheme_args(weighting)
    options = (ignore_index, label_smoothing, REDUCTION_CODES[reduction], scheme, smoothing, beta, gamma, loss_dtype)
    if _eager_autograd(input):
        return _EagerCrossEntropy.apply(input, target, weight, sample_weight, options, _ops)
    if _eager_no_graph(input):
        with _below_autograd():
            return _ops.cross_entropy_forward(input, target, weight, sample_weight, *options)[0]
    loss, _lse, _class_weight, _norm = _ops.cross_entropy_forward(
        input, target, weight, sample_weight, *options
    )
    return loss


class _EagerCrossEntropy(torch.autograd.Function):
    """The eager-mode twin of the autograd formula registered on ``cross_entropy_forward``: the same
    operators and saved tensors, without torch.library's per-call Python work (see _eager_autograd)."""

    @staticmethod
    def forward(ctx, input, target, weight, sample_weight, options, ops):
        with _below_autograd():
            loss, lse, class_weight, norm = ops.cross_entropy_forward(input, target, weight, sample_weight, *options)
        ctx.save_for_backward(input, target, sample_weight, lse, class_weight, norm)
        ctx.options = (options[0], options[1], options[2], options[6])
        ctx.ops = ops
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        input, target, sample_weight, lse, class_weight, norm = ctx.saved_tensors
        grad_input = _eager_backward_call(
            ctx.ops.cross_entropy_backward,
            grad_loss, input, target, class_weight, sample_weight, lse, norm, *ctx.options,
        )
        return grad_input, None, None, None, None, None


# ---- cross-entropy with probability targets -------------------------------------------------------

def _ce_prob_forward_fake(input, target, weight, sample_weight, label_smoothing, reduction, scheme, smoothing, beta,
                          loss_dtype=None):
    torch._check(input.dim() >= 1, lambda: "cross_entropy_prob_forward: input must have at least 1 dimension")
    torch._check(target.shape == input.shape,
                 lambda: "cross_entropy_prob_forward: probability targets must have the input's shape")
    torch._check(prob_target_supported(input, target),
                 lambda: "cross_entropy_prob_forward: target must have the input's dtype (or float32 with half input)")
    loss_shape = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty(loss_shape if reduction == 0 else (), dtype=_loss_dtype_of(loss_dtype, input.dtype))
    stats = input.new_empty((3, math.prod(loss_shape)), dtype=acc)  # lse hi, lse lo, B
    has_class_weight = weight is not None or scheme != 0
    class_weight = input.new_empty((num_classes,) if has_class_weight else (0,), dtype=acc)
    return loss, stats, class_weight, input.new_empty((), dtype=acc)


def _ce_prob_backward_fake(grad_loss, input, target, class_weight, sample_weight, stats, norm, label_smoothing,
                           reduction):
    return ce_grad_like(input)


def _ce_prob_setup_context(ctx, inputs, output):
    input, target, _weight, sample_weight, label_smoothing, reduction = inputs[:6]
    _loss, stats, class_weight, norm = output
    ctx.mark_non_differentiable(stats, class_weight, norm)
    ctx.options = (label_smoothing, reduction)
    ctx.num_inputs = len(inputs)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(input, target, sample_weight, stats, class_weight, norm)


def _ce_prob_backward(ctx, grad_loss, *_unused):
    if any(ctx.needs_input_grad[1:4]):
        raise RuntimeError(
            "fused_wloss.cross_entropy_prob_forward: gradients with respect to target, weight or sample_weight "
            "are not computed by the kernels; fused_wloss.cross_entropy sends such calls to the reference"
        )
    grad_input = None
    if ctx.needs_input_grad[0]:
        input, target, sample_weight, stats, class_weight, norm = ctx.saved_tensors
        grad_input = _ops.cross_entropy_prob_backward(
            grad_loss, input, target, class_weight, sample_weight, stats, norm, *ctx.options
        )
    return (grad_input,) + (None,) * (ctx.num_inputs - 1)


def prob_target_supported(input, target) -> bool:
    """Probability targets of the input's dtype, or float32 with float16/bfloat16 logits."""
    return target.dtype == input.dtype or (
        target.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16)
    )


def cross_entropy_prob(input, target, weight, reduction, label_smoothing, sample_weight,
                       weighting: Optional[BatchWeighting], loss_dtype: Optional[torch.dtype] = None):
    """The kernel path of the public function for probability targets (``ce_supported`` calls)."""
    scheme, smoothing, beta, _ = _scheme_args(weighting)
    options = (label_smoothing, REDUCTION_CODES[reduction], scheme, smoothing, beta, loss_dtype)
    if _eager_autograd(input):
        return _EagerCrossEntropyProb.apply(input, target, weight, sample_weight, options, _ops)
    if _eager_no_graph(input):
        with _below_autograd():
            return _ops.cross_entropy_prob_forward(input, target, weight, sample_weight, *options)[0]
    return _ops.cross_entropy_prob_forward(input, target, weight, sample_weight, *options)[0]


class _EagerCrossEntropyProb(torch.autograd.Function):
    """The eager-mode twin of the formula registered on ``cross_entropy_prob_forward``."""

    @staticmethod
    def forward(ctx, input, target, weight, sample_weight, options, ops):
        with _below_autograd():
            loss, stats, class_weight, norm = ops.cross_entropy_prob_forward(
                input, target, weight, sample_weight, *options)
        ctx.save_for_backward(input, target, sample_weight, stats, class_weight, norm)
        ctx.options = (options[0], options[1])
        ctx.ops = ops
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        input, target, sample_weight, stats, class_weight, norm = ctx.saved_tensors
        grad_input = _eager_backward_call(
            ctx.ops.cross_entropy_prob_backward,
            grad_loss, input, target, class_weight, sample_weight, stats, norm, *ctx.options,
        )
        return grad_input, None, None, None, None, None


# ---- binary cross-entropy -------------------------------------------------------------------------

def _bce_forward_fake(input, target, weight, pos_weight, sample_weight, reduction, scheme, smoothing, beta, balanced,
                      gamma=0.0, alpha=-1.0, loss_dtype=None):
    torch._check(target.shape == input.shape, lambda: "bce_forward: target must have the input's shape")
    torch._check(bce_target_supported(input, target),
                 lambda: "bce_forward: target must have the input's dtype (or float32 with float16/bfloat16 input)")
    acc = _acc_dtype(input.dtype)
    num_labels = input.shape[-1] if input.dim() >= 2 else 1
    label_shape = (num_labels,) if scheme != 0 else (0,)
    loss = input.new_empty(input.shape if reduction == 0 else (), dtype=_loss_dtype_of(loss_dtype, input.dtype))
    return loss, input.new_empty(label_shape, dtype=acc), input.new_empty(label_shape, dtype=acc)


def _bce_backward_fake(grad_loss, input, target, weight, pos_weight, sample_weight, neg_label_weight, pos_label_weight, reduction,
                       gamma=0.0, alpha=-1.0):
    return input.new_empty(input.shape)


def _bce_setup_context(ctx, inputs, output):
    input, target, weight, pos_weight, sample_weight, reduction = inputs[:6]
    _loss, neg_label_weight, pos_label_weight = output
    ctx.mark_non_differentiable(neg_label_weight, pos_label_weight)
    ctx.reduction = reduction
    ctx.focal = (inputs[10] if len(inputs) > 10 else 0.0, inputs[11] if len(inputs) > 11 else -1.0)
    ctx.num_inputs = len(inputs)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(input, target, weight, pos_weight, sample_weight, neg_label_weight, pos_label_weight)


def _bce_backward(ctx, grad_loss, *_unused):
    if any(ctx.needs_input_grad[1:5]):
        raise RuntimeError(
            "fused_wloss.bce_forward: gradients with respect to target, weight, pos_weight or "
            "sample_weight are not computed by the kernels; fused_wloss.binary_cross_entropy_with_logits "
            "sends such calls to the reference"
        )
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.bce_backward(grad_loss, *ctx.saved_tensors, ctx.reduction, *ctx.focal)
    return (grad_input,) + (None,) * (ctx.num_inputs - 1)


def bce_target_supported(input, target) -> bool:
    """Targets of the input's dtype, or float32 targets with float16/bfloat16 logits (the usual
    mixed-precision call), which the kernels read as they are."""
    return target.dtype == input.dtype or (
        target.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16)
    )


def bce_supported(input, target, weight, pos_weight, sample_weight) -> bool:
    return not (
        functorch_active()
        or input.dtype not in KERNEL_DTYPES
        or not bce_target_supported(input, target)
        or target.requires_grad
        or _wants_grad(weight)
        or _wants_grad(pos_weight)
        or _wants_grad(sample_weight)
    )


def binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight, sample_weight,
                                     weighting: Optional[BatchWeighting], gamma: float = 0.0,
                                     alpha: Optional[float] = None, loss_dtype: Optional[torch.dtype] = None):
    """The kernel path of the public function, for calls ``bce_supported`` accepts."""
    scheme, smoothing, beta, balanced = _scheme_args(weighting)
    options = (REDUCTION_CODES[reduction], scheme, smoothing, beta, balanced, gamma, -1.0 if alpha is None else alpha,
               loss_dtype)
    if _eager_autograd(input):
        return _EagerBce.apply(input, target, weight, pos_weight, sample_weight, options, _ops)
    if _eager_no_graph(input):
        with _below_autograd():
            return _ops.bce_forward(input, target, weight, pos_weight, sample_weight, *options)[0]
    loss, _neg, _pos = _ops.bce_forward(input, target, weight, pos_weight, sample_weight, *options)
    return loss


class _EagerBce(torch.autograd.Function):
    """The eager-mode twin of the formula registered on ``bce_forward`` (see _eager_autograd)."""

    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, sample_weight, options, ops):
        with _below_autograd():
            loss, neg_label_weight, pos_label_weight = ops.bce_forward(
                input, target, weight, pos_weight, sample_weight, *options
            )
        ctx.save_for_backward(input, target, weight, pos_weight, sample_weight, neg_label_weight, pos_label_weight)
        ctx.options = (options[0], options[5], options[6])
        ctx.ops = ops
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_input = _eager_backward_call(ctx.ops.bce_backward, grad_loss, *ctx.saved_tensors, *ctx.options)
        return grad_input, None, None, None, None, None, None


# ---- double backward: refused with a clear message -------------------------------------------------

def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "fused_wloss: double backward (a gradient of the gradient, e.g. create_graph=True followed by "
        "another backward) is not supported by the fused kernels; use fused_wloss.reference for "
        "higher-order derivatives"
    )


def register(ns: str) -> None:
    """Fake kernels and autograd formulas for the operators of ``torch.ops.<ns>``
    (``cross_entropy_grad_``, which writes the gradient over its input for callers that own the
    logits, has no autograd formula: it is called on tensors outside any graph)."""
    torch.library.register_fake(f"{ns}::cross_entropy_forward", _ce_forward_fake)
    torch.library.register_fake(f"{ns}::cross_entropy_backward", _ce_backward_fake)
    torch.library.register_fake(f"{ns}::cross_entropy_grad_", _ce_grad_inplace_fake)
    torch.library.register_fake(f"{ns}::cross_entropy_prob_forward", _ce_prob_forward_fake)
    torch.library.register_fake(f"{ns}::cross_entropy_prob_backward", _ce_prob_backward_fake)
    torch.library.register_fake(f"{ns}::bce_forward", _bce_forward_fake)
    torch.library.register_fake(f"{ns}::bce_backward", _bce_backward_fake)
    torch.library.register_autograd(f"{ns}::cross_entropy_forward", _ce_backward, setup_context=_ce_setup_context)
    torch.library.register_autograd(f"{ns}::cross_entropy_prob_forward", _ce_prob_backward,
                                    setup_context=_ce_prob_setup_context)
    torch.library.register_autograd(f"{ns}::bce_forward", _bce_backward, setup_context=_bce_setup_context)
    for name in ("cross_entropy_backward", "cross_entropy_prob_backward", "bce_backward"):
        torch.library.register_autograd(f"{ns}::{name}", _refuse_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)


register(NAMESPACE)


def load_emulation() -> str:
    """Load the test-only emulated CUDA operators (``fused_wloss._cuda_emu``, built with
    ``FUSED_WLOSS_BUILD_EMU=1``) and set them up; returns their namespace for :func:`use_namespace`.
    Raises ImportError when the module was not built."""
    global _emulation_registered
    import importlib

    importlib.import_module("fused_wloss._cuda_emu")
    if not _emulation_registered:
        register("fused_wloss_emu")
        _emulation_registered = True
    return "fused_wloss_emu"


_emulation_registered = False
