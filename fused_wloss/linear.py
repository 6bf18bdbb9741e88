"""Fused linear + weighted cross-entropy: the classifier head and the loss without the N x C logits.

``linear_cross_entropy(input, linear_weight, target, ...)`` equals
``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` (torch's
``F.linear_cross_entropy`` semantics, plus fused_wloss's weighting), but the logits exist only one
chunk of rows at a time:

1. Everything that depends on the targets alone is formed first, from the N integers: the class
   counts, the dynamic class weights and the normaliser of ``"mean"``/``"sample_mean"`` (the same
   code as :func:`fused_wloss.cross_entropy`'s ``return_stats``; with ``BatchWeighting(sync=True)``
   summed over the process group). No pass over the logits, no host synchronisation.
2. Per chunk of rows (by default a power of two: as many as keep the chunk's logits within 8 MiB,
   at least 64 while that stays within 32 MiB: see chunk_rows), the logits come from one matmul
   (BLAS or cuBLAS through ATen), the cross-entropy kernels give the chunk's loss and, when a gradient is wanted,
   the gradient of the logits, written over the logits themselves (``cross_entropy_grad_``: no
   second chunk-sized buffer), which is multiplied straight back into the gradients of the input,
   the linear weight and the bias.
3. For a reduced loss those gradients are complete at the end of the forward (the normaliser is
   known up front) and the backward only scales them by ``grad_output``, a device tensor, in
   float32 and in place (so it runs once). For ``reduction="none"`` the backward needs a gradient
   per row, and float16 gradients formed before a GradScaler's scale is known would underflow: both
   recompute each chunk's logits in the backward from the saved per-row log-sum-exp instead.
4. Heads so wide that 64 whole rows would pass 8 MiB (float32 language-model vocabularies of 128k)
   cut the classes too (plan_blocks): thin chunks of rows make every matmul stream the whole
   weight for a few rows, at half the speed of square ones. Blocks of up to 2048 rows by a tile
   of classes take two passes: the forward forms each row's log-sum-exp over the tiles, the
   backward recomputes each tile's logits and turns them into their gradient in place (four
   square matmuls a block where rows take three thin ones; see "class tiles" below).

Both steps are registered operators (``fused_wloss::linear_cross_entropy_forward`` /
``_backward``) with fake kernels and autograd formulas, so ``torch.compile(fullgraph=True)`` traces
the call without a graph break. Probability targets and a K-dimensional ``linear_weight``
(``(C, d1, ..., dk, H)``) are computed by the unfused composition (``F.linear`` then
:func:`fused_wloss.cross_entropy`), which holds the logits.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import _autocast, _checks, distributed, functional, reference
from ._backend import use_extension
from ._weighting import CrossEntropyStats

__all__ = ["DEFAULT_CHUNK_BYTES", "HALF_TILE_ROWS", "LinearCrossEntropyLoss", "MAX_CHUNK_BYTES", "MIN_CHUNK_ROWS",
           "TILE_MIN_ROWS", "TILE_ROWS", "chunk_rows", "linear_cross_entropy", "plan_blocks"]

# Rows per chunk, by default: as many as keep the chunk's logits within DEFAULT_CHUNK_BYTES (peak
# memory near torch's chunked path), but at least MIN_CHUNK_ROWS while the chunk stays within
# MAX_CHUNK_BYTES, rounded down to a power of two (torch's chunked path also cuts powers of two: at
# (4096, 256, 32000) both take 64 rows, where 8 MiB alone would be 65 and 0.1 MiB more). Each
# chunk's weight gradient is a rank-(rows) update that reads and writes all C x H of it, so thin
# chunks of a large head are bound by that traffic: at (2048, 1024, 128256) float32 here, 16-row
# chunks (8 MiB) took 19.4 s a forward+backward, 65 rows (32 MiB) 11.9 s, 256 rows 8.8 s. At
# (4096, 256, 32000) 8 MiB is already 64 rows (4 and 32 MiB were within 7%).
DEFAULT_CHUNK_BYTES = 8 << 20
MAX_CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 64
# Heads wider than that (float32: more than 32768 classes) cut the classes as well (plan_blocks):
# blocks of TILE_ROWS rows by as many classes as fit in DEFAULT_CHUNK_BYTES, a log-sum-exp pass
# and a gradient pass over the class tiles. Four matmuls a block instead of three, but square
# ones: at (2048, 1024, 128256) float32 here, 2048 x 1024 tiles (8 MiB) took 10.1 s against 11.4 s
# for 64-row chunks (31 MiB) and 13.3 s for 32-row chunks (16 MiB). At (4096, 256, 32000), whose
# 64 whole rows fit in 8 MiB, tiles were 10% slower than rows, so that head keeps rows. With few
# rows the blocks get thin again: at H = 1024, C = 128256, 256 rows took 1.64 s in tiles against
# 1.56 s in 64-row chunks, 512 rows 2.81 s against 2.98 s; so tiles from TILE_MIN_ROWS + 1 rows.
TILE_ROWS = 2048
TILE_MIN_ROWS = 256
# Half precision holds more per block: the logits, their float32 copy and their gradient (8 bytes
# a logit), and per block of rows and tile of classes a cast of the input's rows and of the
# weight's (under autocast, from float32) and the products of the two gradient matmuls, all R x H
# or T x H: square blocks keep those smallest. At (2048, 1024, 128256) under bfloat16 autocast the
# peak above the float32 leaves was 551.6 MB with 2048 x 512 blocks, 546.9 MB with 1024 x 1024 and
# 554.2 MB with 512 x 2048 (torch's chunked path, in float32: 550.5 MB), at 3.2 to 3.3 s each.
HALF_TILE_ROWS = 1024

_LOSS = "linear_cross_entropy"


# ---- argument checks ------------------------------------------------------------------------------

def _check_tensor(value, name: str, device: Optional[torch.device] = None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{_LOSS}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{_LOSS}: {name} must be a floating-point tensor, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{_LOSS}: {name} must be on the input's device {device}, got {value.device}")


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _check_args(input, linear_weight, linear_bias, target, weight, sample_weight, ignore_index,
                label_smoothing, chunk_size, autocast_dtype=None):
    """Shapes, dtypes and devices (never tensor data); under autocast (``autocast_dtype``) the
    dtypes F.linear's arguments would be cast to. Returns (num_classes, prob_target)."""

    def dtype_of(t):
        return _autocast_dtype_of(t.dtype, autocast_dtype)

    _check_tensor(input, "input")
    if input.dim() < 1:
        raise ValueError(f"{_LOSS}: input must have shape (H,), (N, H) or (B, T, ..., H), got a 0-d tensor")
    device = input.device
    _check_tensor(linear_weight, "linear_weight", device)
    if linear_weight.dim() < 2:
        raise ValueError(
            f"{_LOSS}: linear_weight must have shape (C, H) or (C, d1, ..., dk, H), got {_shape(linear_weight.shape)}"
        )
    hidden = input.shape[-1]
    if linear_weight.shape[-1] != hidden:
        raise ValueError(
            f"{_LOSS}: linear_weight's last dimension must be the input's last dimension (in_features) "
            f"{hidden}, got linear_weight of shape {_shape(linear_weight.shape)}"
        )
    cast = " (after autocast's cast)" if autocast_dtype is not None else ""
    if dtype_of(linear_weight) != dtype_of(input):
        raise TypeError(
            f"{_LOSS}: linear_weight must have the input's dtype {dtype_of(input)}{cast}, got {linear_weight.dtype}")
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None:
        _check_tensor(linear_bias, "linear_bias", device)
        if tuple(linear_bias.shape) != (num_classes, *out_features):
            raise ValueError(
                f"{_LOSS}: linear_bias must have shape {_shape((num_classes, *out_features))} "
                f"(linear_weight's without in_features), got {_shape(linear_bias.shape)}"
            )
        if dtype_of(linear_bias) != dtype_of(input):
            raise TypeError(
                f"{_LOSS}: linear_bias must have the input's dtype {dtype_of(input)}{cast}, got {linear_bias.dtype}")
    if out_features and input.dim() != 2:
        raise ValueError(
            f"{_LOSS}: a K-dimensional linear_weight {_shape(linear_weight.shape)} needs input of shape (N, H), "
            f"got {_shape(input.shape)}"
        )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{_LOSS}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != device:
        raise ValueError(f"{_LOSS}: target must be on the input's device {device}, got {target.device}")
    lead = tuple(input.shape[:-1])
    index_shape = lead + out_features
    prob_shape = lead + (num_classes,) + out_features
    if target.dtype.is_floating_point:
        if tuple(target.shape) != prob_shape:
            raise ValueError(
                f"{_LOSS}: probability targets must have the logits' shape {_shape(prob_shape)}, "
                f"got {_shape(target.shape)}"
            )
        if ignore_index is not None:
            raise ValueError(f"{_LOSS}: ignore_index cannot be given with probability targets")
        prob_target = True
    else:
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"{_LOSS}: class-index target must be int64 (or int32), or probabilities of a floating dtype, "
                f"got {target.dtype}"
            )
        if tuple(target.shape) != index_shape:
            raise ValueError(
                f"{_LOSS}: class-index target must have shape {_shape(index_shape)} (the input's without "
                f"in_features), got {_shape(target.shape)}"
            )
        prob_target = False
    if weight is not None:
        _check_tensor(weight, "weight", device)
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(f"{_LOSS}: weight must have shape ({num_classes},), got {_shape(weight.shape)}")
    if sample_weight is not None:
        _check_tensor(sample_weight, "sample_weight", device)
        if tuple(sample_weight.shape) != index_shape:
            raise ValueError(
                f"{_LOSS}: sample_weight must have the shape of the unreduced loss {_shape(index_shape)}, "
                f"got {_shape(sample_weight.shape)}"
            )
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"{_LOSS}: ignore_index must be an int or None, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
        0.0 <= label_smoothing <= 1.0
    ):
        raise ValueError(f"{_LOSS}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    _check_chunk_size(chunk_size)
    return num_classes, prob_target


def _check_chunk_size(chunk_size) -> None:
    def positive(v):
        return not isinstance(v, bool) and isinstance(v, int) and v >= 1

    if chunk_size is None or positive(chunk_size):
        return
    if isinstance(chunk_size, tuple) and len(chunk_size) == 2 and all(positive(v) for v in chunk_size):
        return
    raise ValueError(
        f"{_LOSS}: chunk_size must be a positive int (rows per chunk), a pair of positive ints "
        f"(rows, classes) per block, or None, got {chunk_size!r}")


def _as_int_or_none(value, name: str):
    """An int (Python's or NumPy's) as int; None as None; anything else is refused by the checks."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return value
    return int(value)


def _as_chunk_size(value):
    """chunk_size with NumPy's ints as ints, and a (rows, classes) list as a tuple."""
    if isinstance(value, (tuple, list)):
        return tuple(_as_int_or_none(v, "chunk_size") for v in value)
    return _as_int_or_none(value, "chunk_size")


def chunk_rows(num_rows: int, num_classes: int, dtype: torch.dtype, chunk_size: Optional[int] = None) -> int:
    """Rows per chunk: ``chunk_size`` when given, else as many as keep one chunk's logits within
    :data:`DEFAULT_CHUNK_BYTES`, raised to :data:`MIN_CHUNK_ROWS` where that stays within
    :data:`MAX_CHUNK_BYTES`, rounded down to a power of two (at least one row, at most ``num_rows``)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(num_rows, 1)))
    row_bytes = max(1, num_classes * torch.empty((), dtype=dtype).element_size())
    rows = max(1, DEFAULT_CHUNK_BYTES // row_bytes, min(MIN_CHUNK_ROWS, MAX_CHUNK_BYTES // row_bytes))
    return min(max(num_rows, 1), 1 << (rows.bit_length() - 1))


def plan_blocks(num_rows: int, num_classes: int, dtype: torch.dtype, chunk_size=None, *,
                cast_head_bytes: int = 0) -> Tuple[int, int]:
    """The blocks of logits the fused path forms: ``(rows, classes)``, where ``classes`` is 0 for
    whole rows (one pass, :func:`chunk_rows`) and otherwise the class tile of the two-pass path.

    ``chunk_size`` as given to :func:`linear_cross_entropy`: an int is rows of whole rows, a pair
    is (rows, classes). By default, heads too wide for :data:`MIN_CHUNK_ROWS` whole rows in
    :data:`DEFAULT_CHUNK_BYTES` take class tiles when there are more than :data:`TILE_MIN_ROWS`
    rows: blocks of up to :data:`TILE_ROWS` rows by as many classes as fit in
    :data:`DEFAULT_CHUNK_BYTES`; in half precision up to :data:`HALF_TILE_ROWS` rows, counting 8
    bytes a logit (the logits, the float32 copy their softmax is formed in, their half-precision
    gradient). So do heads that whole rows would first copy into ``dtype`` (``cast_head_bytes``,
    under autocast a float32 head's bfloat16 copy) when that copy passes
    :data:`DEFAULT_CHUNK_BYTES`: tiles cast a tile at a time, and give the head its float32
    gradient without a bfloat16 one beside it."""
    if isinstance(chunk_size, tuple):
        rows, classes = chunk_size
        rows = max(1, min(rows, max(num_rows, 1)))
        return rows, (0 if classes >= num_classes else classes)
    elem = dtype.itemsize
    wide = MIN_CHUNK_ROWS * num_classes * elem > DEFAULT_CHUNK_BYTES and num_rows > TILE_MIN_ROWS
    # (the cast rule is for memory, whatever the rows: a 128k x 4096 head's copy is 1 GB)
    casts_head = cast_head_bytes > DEFAULT_CHUNK_BYTES and num_rows > 0
    if chunk_size is None and (wide or casts_head):
        if dtype in (torch.float32, torch.float64):
            rows, block_elem = min(num_rows, TILE_ROWS), elem
        else:  # the logits, their float32 copy and their half-precision gradient
            rows, block_elem = min(num_rows, HALF_TILE_ROWS), 8
        classes = max(1, DEFAULT_CHUNK_BYTES // (rows * block_elem))
        if classes < num_classes:
            return rows, classes
    return chunk_rows(num_rows, num_classes, dtype, chunk_size), 0


# ---- the operators --------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(x, linear_weight, linear_bias):
    if linear_bias is None:
        return torch.mm(x, linear_weight.t())
    return torch.addmm(linear_bias, x, linear_weight.t())


_HALF_PRODUCT_BYTES = 16 << 20  # the largest half-precision weight-gradient product formed at once


class _GradSink:
    """The gradients of input, linear weight and bias, filled chunk by chunk from the gradient of
    each chunk's logits. The weight's and bias's sums over chunks are kept in the accumulation
    dtype (float32 for half inputs: each chunk's matmul rounds once, their sum does not)."""

    def __init__(self, input, linear_weight, linear_bias, needs: List[bool]):
        acc = _acc_dtype(input.dtype)
        self.want_input, self.want_weight, self.want_bias = (
            needs[0], needs[1], needs[2] and linear_bias is not None)
        self.linear_weight = linear_weight
        self.half = acc != input.dtype
        # (a distinct empty tensor for each gradient not formed: an operator's outputs may not alias)
        self.input = torch.empty_like(input) if self.want_input else input.new_empty(0)
        self.weight = (torch.zeros(linear_weight.shape, dtype=acc, device=input.device)
                       if self.want_weight else input.new_empty(0))
        self.bias = (torch.zeros(linear_weight.shape[0], dtype=acc, device=input.device)
                     if self.want_bias else input.new_empty(0))
        self.out_dtype = input.dtype

    def any(self) -> bool:
        return self.want_input or self.want_weight or self.want_bias

    def add(self, r0: int, r1: int, x, grad_logits) -> None:
        if self.want_input:
            torch.mm(grad_logits, self.linear_weight, out=self.input[r0:r1])
        if self.want_weight:
            if self.half:
                # the chunk's product in the input's dtype, added into the float32 sum a block of
                # classes at a time: a whole C x H half-precision temporary per chunk was 262 MB at
                # (2048, 1024, 128256)
                step = max(1, _HALF_PRODUCT_BYTES // max(1, x.shape[1] * x.element_size()))
                for c0 in range(0, self.weight.shape[0], step):
                    self.weight[c0:c0 + step].add_(torch.mm(grad_logits[:, c0:c0 + step].t(), x))
            else:
                self.weight.addmm_(grad_logits.t(), x)
        if self.want_bias:
            self.bias.add_(grad_logits.sum(0, dtype=self.bias.dtype))

    def result(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = self.weight.to(self.out_dtype) if self.want_weight else self.weight
        bias = self.bias.to(self.out_dtype) if self.want_bias else self.bias
        return self.input, weight, bias


def _check_one_dtype(input, linear_weight, linear_bias, compute_dtype) -> None:
    """Whole rows take the weight in the input's dtype and compute in it (class tiles cast the
    input and the weight a block at a time)."""
    for t, name in ((linear_weight, "linear_weight"), (linear_bias, "linear_bias")):
        torch._check(t is None or t.dtype == input.dtype,
                     lambda: f"linear_cross_entropy_forward: {name} must have the input's dtype {input.dtype} "
                     f"unless chunk_classes cuts the classes, got {t.dtype}")
    torch._check(compute_dtype in (None, input.dtype),
                 lambda: f"linear_cross_entropy_forward: compute_dtype {compute_dtype} needs class tiles "
                 f"(chunk_classes); whole rows compute in the input's dtype {input.dtype}")


def _tiled(chunk_classes: int, linear_weight: torch.Tensor) -> bool:
    """Whether the operators take the class-tiled two-pass path."""
    return 0 < chunk_classes < linear_weight.shape[0]


def _recomputes(reduce: bool, dtype: torch.dtype) -> bool:
    """Whether the backward recomputes each chunk's logits instead of scaling gradients the
    forward formed: for reduction="none" (a gradient per row), and for float16, whose gradients
    formed before the loss scale of a GradScaler is known would underflow (float16 has 5 exponent
    bits; bfloat16 has float32's range and keeps the forward-formed gradients)."""
    return not reduce or dtype == torch.float16


def _chunks(input, linear_weight, linear_bias, target, sample_weight, chunk_rows):
    """Per chunk of rows: (r0, r1, input rows, targets, sample weights, logits), autocast off (the
    matmuls run in the dtype the caller chose; autocast would also refuse mm's out=)."""
    with torch.autocast(input.device.type, enabled=False):
        for r0 in range(0, input.shape[0], chunk_rows):
            r1 = min(input.shape[0], r0 + chunk_rows)
            x = input[r0:r1]
            sw = None if sample_weight is None else sample_weight[r0:r1]
            yield r0, r1, x, target[r0:r1], sw, _chunk_logits(x, linear_weight, linear_bias)


# ---- class tiles: the two-pass path -------------------------------------------------------------
#
# A block of rows is cut into tiles of classes. The forward (pass 1) forms each row's log-sum-exp
# online over the tiles, kept as (m, log s): the running maximum m and the log of the sum of
# exp(logit - m), so that nll = (m - z_t) + log s loses nothing to a large m, as the kernels keep
# theirs in two parts. It also picks up the target logit z_t from the tile that holds it and, for
# label smoothing, sum_c W_c (z_c - m). The backward (pass 2) recomputes each tile's logits and writes their gradient
# over them,
#     A_i p_ic - B_i [c == t_i] - E_i W_c,
# with the per-row coefficients of csrc/fused_wloss_math.h (ce_grad_coeffs, focal_ce_grad_factor)
# and p_ic = exp(z_ic - m_i - log s_i); then multiplies it into the gradients of the input, the
# linear weight (a tile's classes, once per block of rows) and the bias. The loss math runs in the
# accumulation dtype, in place on the tile (half-precision tiles are copied to float32 for it and
# their gradient rounded once for the matmuls).

def _tile_of(linear_weight, linear_bias, c0: int, c1: int, dtype):
    """The weight's (and bias's) rows of a tile, in the dtype of the matmuls: a float32 head under
    autocast is cast a tile at a time, never whole."""
    w_tile = linear_weight[c0:c1].to(dtype)
    return w_tile, None if linear_bias is None else linear_bias[c0:c1].to(dtype)


def _tile_ranges(num_classes: int, classes: int):
    for c0 in range(0, num_classes, classes):
        yield c0, min(num_classes, c0 + classes)


def _target_in_tile(t, c0: int, c1: int):
    """(column of the target within the tile, clamped; whether the tile holds it)."""
    return (t - c0).clamp(0, c1 - c0 - 1), (t >= c0) & (t < c1)


def _tiled_stats(input, linear_weight, linear_bias, target, class_weight, label_smoothing, rows, classes,
                 compute_dtype=None):
    """Pass 1 over every block: per row (m, log s, z_t) as a (3, N) tensor and, for label
    smoothing, q = sum_c W_c (z_c - m) (else None; the loss needs it, the backward does not).

    m is the running maximum (0 while a row has seen only -inf), s the sum of exp(z - m). Each
    tile is shifted by the maximum so far, tile included, so every exp is at most 1 and a tile far
    below the others (or all -inf, as masked padding classes) adds what it should: nothing. A +inf
    or NaN logit makes m, and the row's loss, NaN, as in the one-pass kernels. q is kept relative
    to the current m: every term it gathers is <= 0, so sum_c W_c (lse - z_c) = W log s - q adds
    two non-negative numbers."""
    n, num_classes = input.shape[0], linear_weight.shape[0]
    cd = compute_dtype or input.dtype
    acc = _acc_dtype(cd)
    stats = input.new_empty((3, n), dtype=acc)
    smooth = input.new_empty(n, dtype=acc) if label_smoothing > 0.0 else None
    with torch.autocast(input.device.type, enabled=False):
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            x, t = input[r0:r1].to(cd), target[r0:r1]
            top = torch.full((r1 - r0,), -math.inf, dtype=acc, device=input.device)
            m = torch.zeros_like(top)
            s = torch.zeros_like(top)
            z_t = torch.zeros_like(top)
            q = torch.zeros_like(top) if smooth is not None else None
            seen_weight = 0.0
            for c0, c1 in _tile_ranges(num_classes, classes):
                z = _chunk_logits(x, *_tile_of(linear_weight, linear_bias, c0, c1, cd)).to(acc)
                col, hit = _target_in_tile(t, c0, c1)
                z_t = torch.where(hit, z.gather(1, col[:, None]).squeeze(1), z_t)
                top = torch.maximum(top, z.amax(1))  # NaN stays NaN
                m_new = torch.where(top == -math.inf, 0.0, top)
                step = (m - m_new).clamp_(max=0.0)  # > 0 only for the 0 of a row of -inf, whose s and q are 0
                z.sub_(m_new[:, None])
                if q is not None:
                    w_tile = None if class_weight is None else class_weight[c0:c1]
                    q = q + seen_weight * step + (z.sum(1) if w_tile is None else torch.mv(z, w_tile))
                    seen_weight = seen_weight + ((c1 - c0) if w_tile is None else w_tile.sum())
                s = s * torch.exp(step) + z.exp_().sum(1)
                m = m_new
                del z
            del x  # (a cast of the block: not alive beside the next one's)
            stats[0, r0:r1] = m
            stats[1, r0:r1] = s.log()
            stats[2, r0:r1] = z_t
            if q is not None:
                smooth[r0:r1] = q
    return stats, smooth


def _row_weights(target, class_weight, sample_weight, ignore_index, dtype):
    """(valid, W[t_i] (or None), s_i v_i): the target's class weight and the row's weight."""
    valid = target != ignore_index
    w_t = None
    if class_weight is not None:
        w_t = class_weight[torch.where(valid, target, 0).clamp(0, max(class_weight.shape[0] - 1, 0))]
    row = valid.to(dtype)
    if sample_weight is not None:
        row = row * sample_weight
    return valid, w_t, row


def _tiled_losses(stats, smooth, target, class_weight, sample_weight, ignore_index, label_smoothing, gamma,
                  num_classes):
    """The row losses from pass 1's statistics (fused_wloss.reference's formula, ignored rows 0)."""
    m, log_s, z_t = stats
    valid, w_t, row = _row_weights(target, class_weight, sample_weight, ignore_index, stats.dtype)
    nll = (m - z_t) + log_s
    if gamma > 0.0:  # (1 - p_t)^gamma nll, as the reference forms it
        nll = reference._focal_factor(-torch.expm1(-nll), gamma) * nll
    loss = nll if w_t is None else w_t * nll
    if label_smoothing > 0.0:
        total_weight = num_classes if class_weight is None else class_weight.sum()
        smoothed = total_weight * log_s - smooth  # sum_c W_c (lse - z_c), lse = m + log s
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / num_classes) * smoothed
    return torch.where(valid, row * loss, 0.0)


def _accumulate(out, first: bool, a, b) -> None:
    """out = a @ b on the first call, out += a @ b after; in one matmul where out has the
    matmul's dtype, else the product (in a's dtype) converted as it is added."""
    if out.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif first:
        out.copy_(torch.mm(a, b))
    else:
        out.add_(torch.mm(a, b))


def _subtract_at(g, at, values) -> None:
    """g.view(-1)[at] -= values, one element a row. index_put_ without accumulation is
    deterministic on CUDA, where scatter_ and scatter_add_ are refused under
    torch.use_deterministic_algorithms(True). (A function, so that no view of the tile outlives
    it: a view kept in the loop held the previous tile alive through the next one's matmul.)"""
    flat = g.view(-1)
    flat.index_put_((at,), flat[at] - values)


def _tiled_backward(grad_loss, input, linear_weight, linear_bias, target, class_weight, sample_weight, stats,
                    ignore_index, label_smoothing, gamma, rows, classes, needs, compute_dtype=None):
    """Pass 2: the gradients of sum_i grad_loss_i loss_i with respect to input, linear weight and
    bias (where ``needs`` asks), each tile's logits recomputed and turned into their gradient in
    place. Half precision: the tile's gradient is formed in float32 and rounded once for its two
    matmuls; the input's gradient is summed over the tiles, and the weight's over blocks of rows
    (when there are several), in float32."""
    n, num_classes = input.shape[0], linear_weight.shape[0]
    cd = compute_dtype or input.dtype  # the matmuls' dtype; each gradient comes in its tensor's own
    acc = _acc_dtype(cd)
    half = acc != cd
    want_x, want_w, want_b = needs[0], needs[1], needs[2] and linear_bias is not None
    grad_x = torch.empty_like(input) if want_x else input.new_empty(0)
    # in the weight's own dtype (a float32 head under autocast gets its float32 gradient), written by
    # the first block of rows (none at all without rows); summed in float32 over several blocks of
    # half-precision rows
    w_dtype = acc if n > rows and linear_weight.dtype != acc else linear_weight.dtype
    grad_w = (torch.empty_like(linear_weight, dtype=w_dtype) if n else torch.zeros_like(linear_weight)) \
        if want_w else input.new_empty(0)
    grad_b = torch.zeros_like(linear_bias, dtype=acc) if want_b else input.new_empty(0)
    if not (want_x or want_w or want_b):
        return grad_x, grad_w, grad_b
    eps = label_smoothing
    if eps > 0.0:
        total_weight = num_classes if class_weight is None else class_weight.sum()
    grad_loss = grad_loss.to(acc)
    # the input's gradient is summed over the tiles in the accumulation dtype: in place where the
    # input has it (also a float32 input under autocast), else in a buffer of the block
    x_in_place = grad_x.dtype == acc
    with torch.autocast(input.device.type, enabled=False):
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            x, t = input[r0:r1].to(cd), target[r0:r1]
            m, log_s, z_t = stats[:, r0:r1]
            valid, w_t, row = _row_weights(t, class_weight, None if sample_weight is None else sample_weight[r0:r1],
                                           ignore_index, acc)
            f_row = torch.where(valid, grad_loss[r0:r1] * row, 0.0)
            f = f_row if w_t is None else f_row * w_t
            e = None
            if gamma > 0.0:  # focal_ce_grad_factor
                nll = (m - z_t) + log_s
                u, p_t = -torch.expm1(-nll), torch.exp(-nll)
                u_safe = torch.where(u > 0, u, 1.0)
                factor = u_safe ** gamma + gamma * p_t * u_safe ** (gamma - 1.0) * torch.where(p_t > 0, nll, 0.0)
                a = b = f * torch.where(u > 0, factor, 0.0)
            elif eps > 0.0:
                b = (1.0 - eps) * f
                a = b + (eps * total_weight / num_classes) * f_row
                e = (eps / num_classes) * f_row
            else:
                a = b = f
            sum_x = None
            if want_x:
                sum_x = grad_x[r0:r1] if x_in_place else x.new_empty((r1 - r0, x.shape[1]), dtype=acc)
            row_base = torch.arange(r1 - r0, device=input.device)
            for c0, c1 in _tile_ranges(num_classes, classes):
                w_tile, b_tile = _tile_of(linear_weight, linear_bias, c0, c1, cd)
                g = _chunk_logits(x, w_tile, b_tile).to(acc)
                del b_tile
                g.sub_(m[:, None]).sub_(log_s[:, None]).exp_().mul_(a[:, None])
                g.masked_fill_(~valid[:, None], 0.0)  # an ignored row's gradient is 0, even where its logits are not finite
                if e is not None:
                    if class_weight is None:
                        g.sub_(e[:, None])
                    else:
                        g.addr_(e, class_weight[c0:c1], alpha=-1)
                col, hit = _target_in_tile(t, c0, c1)
                _subtract_at(g, row_base * (c1 - c0) + col, torch.where(hit & valid, b, 0.0))
                if want_b:
                    grad_b[c0:c1] += g.sum(0)
                if half:
                    g = g.to(cd)
                if want_x:
                    _accumulate(sum_x, c0 == 0, g, w_tile)
                if want_w:
                    _accumulate(grad_w[c0:c1], r0 == 0, g.t(), x)
                del g
            if want_x and not x_in_place:
                grad_x[r0:r1] = sum_x
            del sum_x, x
    if want_w and grad_w.dtype != linear_weight.dtype:
        grad_w = grad_w.to(linear_weight.dtype)
    if want_b:
        grad_b = grad_b.to(linear_bias.dtype)
    return grad_x, grad_w, grad_b


def _ce_ops():
    from . import ops

    return ops._ops  # the namespace the wrappers use (the tests may point it at the emulation)


@torch.library.custom_op("fused_wloss::linear_cross_entropy_forward", mutates_args=())
def _forward_op(
    input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: Optional[torch.Tensor],
    target: torch.Tensor, class_weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
    scale: torch.Tensor, ignore_index: int, label_smoothing: float, reduce: bool, gamma: float,
    chunk_rows: int, needs_grad: List[bool], loss_dtype: Optional[torch.dtype], chunk_classes: int = 0,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """input (N, H), linear_weight (C, H), target (N,). ``reduce``: returns ``scale`` times the
    weighted sum of the row losses (in the accumulation dtype) and, where ``needs_grad`` asks,
    its gradients with respect to input, linear_weight and linear_bias; else the row losses
    (``loss_dtype``) and their log-sum-exp, shape (2, N), for the backward. With class tiles
    (0 < ``chunk_classes`` < C) only the loss, and the statistics of pass 1, shape (3, N), for the
    backward, which recomputes the logits; there the matmuls run in ``compute_dtype`` (autocast's),
    input and weight cast a block at a time, each gradient in its tensor's own dtype."""
    if _tiled(chunk_classes, linear_weight):
        stats, smooth = _tiled_stats(input, linear_weight, linear_bias, target, class_weight, label_smoothing,
                                     chunk_rows, chunk_classes, compute_dtype)
        losses = _tiled_losses(stats, smooth, target, class_weight, sample_weight, ignore_index, label_smoothing,
                               gamma, linear_weight.shape[0])
        loss = losses.sum() * scale if reduce else losses.to(loss_dtype or input.dtype)
        return (loss, input.new_empty(0), input.new_empty(0), input.new_empty(0), stats)
    _check_one_dtype(input, linear_weight, linear_bias, compute_dtype)
    ops = _ce_ops()
    acc = _acc_dtype(input.dtype)
    n = input.shape[0]
    keep_lse = _recomputes(reduce, input.dtype)
    sink = _GradSink(input, linear_weight, linear_bias, [False] * 3 if keep_lse else needs_grad)
    reduction = 1 if reduce else 0
    row_loss_dtype = acc if reduce else loss_dtype
    total = torch.zeros((), dtype=acc, device=input.device)
    weights = input.new_empty(0, dtype=acc) if class_weight is None else class_weight
    losses, lse = input.new_empty(0), input.new_empty(0)
    if keep_lse:
        lse = input.new_empty((2, n), dtype=acc)
    if not reduce:
        losses = input.new_empty(n, dtype=loss_dtype or input.dtype)
    for r0, r1, x, t, sw, logits in _chunks(input, linear_weight, linear_bias, target, sample_weight, chunk_rows):
        loss, chunk_lse, cw, norm = ops.cross_entropy_forward(
            logits, t, class_weight, sw, ignore_index, label_smoothing, reduction, 0, 1.0, 0.999, gamma,
            row_loss_dtype)
        del cw  # the kernel's copy of class_weight (C long): not held through the chunk's matmuls
        if keep_lse:
            lse[:, r0:r1] = chunk_lse
        if not reduce:
            losses[r0:r1] = loss
            del logits
            continue
        total += loss
        if sink.any():  # the logits' gradient, written over them
            grad_logits = ops.cross_entropy_grad_(
                logits, scale, t, weights, sw, chunk_lse, norm, ignore_index, label_smoothing, 1, gamma)
            sink.add(r0, r1, x, grad_logits)
            del grad_logits
        del logits  # before the next chunk's: one chunk alive at a time
    if reduce:
        return (total * scale, *sink.result(), lse)
    return (losses, *sink.result(), lse)


@_forward_op.register_fake
def _forward_fake(input, linear_weight, linear_bias, target, class_weight, sample_weight, scale, ignore_index,
                  label_smoothing, reduce, gamma, chunk_rows, needs_grad, loss_dtype, chunk_classes=0,
                  compute_dtype=None):
    torch._check(input.dim() == 2 and linear_weight.dim() == 2,
                 lambda: "linear_cross_entropy_forward: input (N, H) and linear_weight (C, H)")
    acc = _acc_dtype(compute_dtype or input.dtype)  # (whole rows: compute_dtype is None or input's, checked below)
    n = input.shape[0]
    if _tiled(chunk_classes, linear_weight):
        loss = input.new_empty(() if reduce else (n,), dtype=acc if reduce else (loss_dtype or input.dtype))
        return (loss, input.new_empty(0), input.new_empty(0), input.new_empty(0), input.new_empty((3, n), dtype=acc))
    _check_one_dtype(input, linear_weight, linear_bias, compute_dtype)
    if not reduce:
        return (input.new_empty(n, dtype=loss_dtype or input.dtype), input.new_empty(0), input.new_empty(0),
                input.new_empty(0), input.new_empty((2, n), dtype=acc))
    if _recomputes(reduce, input.dtype):
        return (input.new_empty((), dtype=acc), input.new_empty(0), input.new_empty(0), input.new_empty(0),
                input.new_empty((2, n), dtype=acc))
    return (input.new_empty((), dtype=acc), *_grads_fake(input, linear_weight, linear_bias, needs_grad),
            input.new_empty(0))


def _grads_fake(input, linear_weight, linear_bias, needs_grad):
    return (torch.empty_like(input) if needs_grad[0] else input.new_empty(0),
            torch.empty_like(linear_weight) if needs_grad[1] else input.new_empty(0),
            torch.empty_like(linear_bias) if needs_grad[2] and linear_bias is not None else input.new_empty(0))


@torch.library.custom_op("fused_wloss::linear_cross_entropy_backward", mutates_args=())
def _backward_op(
    grad_loss: torch.Tensor, input: torch.Tensor, linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor], target: torch.Tensor, class_weight: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor], lse: torch.Tensor, ignore_index: int, label_smoothing: float,
    gamma: float, chunk_rows: int, needs_grad: List[bool], chunk_classes: int = 0,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``reduction="none"``'s row losses weighted by ``grad_loss`` (N,): each
    chunk's logits recomputed, their gradient from the saved log-sum-exp (with class tiles, from
    pass 1's statistics, shape (3, N))."""
    if _tiled(chunk_classes, linear_weight):
        return _tiled_backward(grad_loss, input, linear_weight, linear_bias, target, class_weight, sample_weight,
                               lse, ignore_index, label_smoothing, gamma, chunk_rows, chunk_classes, needs_grad,
                               compute_dtype)
    _check_one_dtype(input, linear_weight, linear_bias, compute_dtype)
    ops = _ce_ops()
    sink = _GradSink(input, linear_weight, linear_bias, needs_grad)
    norm = torch.ones((), dtype=lse.dtype, device=input.device)
    empty_cw = lse.new_empty(0)
    for r0, r1, x, t, sw, logits in _chunks(input, linear_weight, linear_bias, target, sample_weight, chunk_rows):
        grad_logits = ops.cross_entropy_grad_(
            logits, grad_loss[r0:r1], t, empty_cw if class_weight is None else class_weight, sw,
            lse[:, r0:r1].contiguous(), norm, ignore_index, label_smoothing, 0, gamma)
        sink.add(r0, r1, x, grad_logits)
        del logits, grad_logits  # before the next chunk's
    return sink.result()


@_backward_op.register_fake
def _backward_fake(grad_loss, input, linear_weight, linear_bias, target, class_weight, sample_weight, lse,
                   ignore_index, label_smoothing, gamma, chunk_rows, needs_grad, chunk_classes=0, compute_dtype=None):
    if not _tiled(chunk_classes, linear_weight):
        _check_one_dtype(input, linear_weight, linear_bias, compute_dtype)
    return _grads_fake(input, linear_weight, linear_bias, needs_grad)


def _setup_forward(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, class_weight, sample_weight, scale, ignore_index,
     label_smoothing, reduce, gamma, chunk_rows, needs_grad, _loss_dtype, *rest) = inputs
    chunk_classes = rest[0] if rest else 0
    compute_dtype = rest[1] if len(rest) > 1 else None
    _loss, grad_input, grad_weight, grad_bias, lse = output
    # only the loss is differentiable; no zero gradients materialised for the other outputs (one
    # would be a tensor of the linear weight's size)
    ctx.mark_non_differentiable(grad_input, grad_weight, grad_bias, lse)
    ctx.set_materialize_grads(False)
    ctx.reduce = reduce
    ctx.recompute = _recomputes(reduce, input.dtype) or _tiled(chunk_classes, linear_weight)
    ctx.needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 linear_bias is not None and ctx.needs_input_grad[2]]
    ctx.told = list(needs_grad)
    ctx.consumed = False
    ctx.refused = any(ctx.needs_input_grad[3:7])
    if ctx.recompute:
        ctx.options = (ignore_index, label_smoothing, gamma, chunk_rows, ctx.needs, chunk_classes, compute_dtype)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, class_weight, sample_weight, lse, scale)
    else:
        ctx.save_for_backward(grad_input, grad_weight, grad_bias)


def _backward_formula(ctx, grad_loss, *_unused):
    if grad_loss is None:  # (materialize_grads off) nothing flows into the loss
        return (None,) * 16
    if ctx.refused:
        raise RuntimeError(
            "fused_wloss.linear_cross_entropy_forward: gradients with respect to target, weight, "
            "sample_weight or scale are not computed by the fused path; "
            "fused_wloss.linear_cross_entropy sends such calls to the unfused composition"
        )
    grads = [None, None, None]
    if not ctx.recompute:
        if any(need and not told for need, told in zip(ctx.needs, ctx.told)):
            raise RuntimeError(
                "fused_wloss.linear_cross_entropy_forward: a gradient is needed that the forward's "
                "needs_grad did not ask it to form")
        # Eagerly the gradients formed in the forward are scaled in place and handed over, so the
        # backward allocates nothing (as torch's chunked path); they can be handed over once.
        # Traced (torch.compile, opcheck: fake or functional tensors), the product is out of place
        # and the graph owns the buffers.
        in_place = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
        if in_place:
            if torch.is_grad_enabled():  # create_graph=True: the handed-over buffers have no graph
                _refuse_double_backward(ctx)
            if ctx.consumed:  # checked before saved_tensors, whose version check would say less
                raise RuntimeError(
                    "fused_wloss.linear_cross_entropy: the backward of a reduced loss hands over the "
                    "gradients its forward formed, so it runs once; for retain_graph=True and a second "
                    "backward, use reduction='none' and reduce it yourself (its backward recomputes the logits), "
                    "or fused_wloss.cross_entropy(F.linear(...))")
            ctx.consumed = True
        saved = ctx.saved_tensors
        for k in range(3):
            if ctx.needs[k]:
                # grad_loss stays in the accumulation dtype: a GradScaler's 2^16 is inf in float16,
                # and bfloat16(1/3) is off by 2e-3 (the product is formed in float32 and rounded once)
                grads[k] = _scaled(saved[k], grad_loss, in_place)
    elif any(ctx.needs):
        input, linear_weight, linear_bias, target, class_weight, sample_weight, lse, scale = ctx.saved_tensors
        if ctx.reduce:  # each row's upstream gradient: grad_output times the reduction's scale
            grad_loss = (grad_loss.to(scale.dtype) * scale).expand(input.shape[0])
        out = torch.ops.fused_wloss.linear_cross_entropy_backward(
            grad_loss, input, linear_weight, linear_bias, target, class_weight, sample_weight, lse, *ctx.options)
        grads = [g if need else None for g, need in zip(out, ctx.needs)]
    return (*grads,) + (None,) * 13


def _scaled(t: torch.Tensor, g: torch.Tensor, in_place: bool) -> torch.Tensor:
    """t * g with the product in g's dtype (float32), rounded once to t's: a half tensor times a
    0-d float32 tensor would first round g to half (bfloat16(1/3) is 2e-3 off). In place, a slice
    at a time, so the float32 temporary stays small."""
    if t.dtype == g.dtype:
        return t.mul_(g) if in_place else t * g
    if not in_place:
        return (t.to(g.dtype) * g).to(t.dtype)
    flat = t.view(-1)
    step = 1 << 20
    for k in range(0, flat.numel(), step):
        part = flat[k:k + step]
        part.copy_(part.to(g.dtype).mul_(g))
    return t


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "fused_wloss: double backward through linear_cross_entropy is not supported by the fused path; "
        "use fused_wloss.cross_entropy(F.linear(...)) for higher-order derivatives"
    )


_forward_op.register_autograd(_backward_formula, setup_context=_setup_forward)
_backward_op.register_autograd(_refuse_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---- the public function --------------------------------------------------------------------------

def _autocast_dtype_of(dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype autocast (casting to ``autocast_dtype``, None when off) gives an argument of
    F.linear: float32/float16/bfloat16 go to the autocast dtype, float64 stays."""
    if autocast_dtype is not None and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return autocast_dtype
    return dtype


def _autocast_cast(autocast_dtype: Optional[torch.dtype], *tensors):
    """What torch.autocast (casting to ``autocast_dtype``, None when off) does to F.linear's
    arguments (see _autocast_dtype_of); None stays None. The casts are differentiable."""
    if autocast_dtype is None:
        return tensors
    return tuple(t if t is None else t.to(_autocast_dtype_of(t.dtype, autocast_dtype)) for t in tensors)


def _fused_supported(input, linear_weight, weight, sample_weight, prob_target) -> bool:
    from . import ops

    return (
        not prob_target
        and linear_weight.dim() == 2
        and use_extension(input.device)
        and input.dtype in ops.KERNEL_DTYPES
        and not ops._wants_grad(weight)
        and not ops._wants_grad(sample_weight)
        and not ops.functorch_active()
    )


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    sample_weight: Optional[torch.Tensor] = None,
    class_weighting=None,
    gamma: float = 0.0,
    return_stats: bool = False,
    chunk_size: Union[int, Tuple[int, int], None] = None,
):
    r"""``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without holding the
    logits: :func:`torch.nn.functional.linear_cross_entropy` plus fused_wloss's weighting.

    Args:
        input: ``(H,)``, ``(N, H)`` or ``(B, T, ..., H)``: any leading dimensions (the language-model
            layout); they are the loss's dimensions.
        linear_weight: ``(C, H)``, or torch's K-dimensional ``(C, d1, ..., dk, H)`` (unfused).
        target: class indices with the input's leading shape (``(N, d1, ..., dk)`` for a
            K-dimensional weight), or class probabilities of the logits' shape (unfused).
        linear_bias: ``(C,)`` (``(C, d1, ..., dk)``) or None.
        weight, reduction, label_smoothing: as in :func:`fused_wloss.cross_entropy` (which adds
            ``"sample_mean"`` to torch's reductions).
        ignore_index: as torch's: ``None`` is -100 for class-index targets and must stay ``None``
            with probability targets.
        sample_weight, class_weighting, gamma, return_stats: as in :func:`fused_wloss.cross_entropy`:
            a weight per element of the unreduced loss (the target's shape), class weights from this
            call's targets (``BatchWeighting(sync=True)`` sums the counts over the process group),
            focal loss, and ``(loss, CrossEntropyStats)`` as the result.
        chunk_size: the blocks of logits the fused path forms (:func:`plan_blocks`). An int:
            chunks of that many whole rows. A pair ``(rows, classes)``: blocks of that many rows
            by that many classes, in two passes. Default: whole rows, as many as keep a chunk
            within 8 MiB (:data:`DEFAULT_CHUNK_BYTES`) and at least 64 while that stays within
            32 MiB, rounded down to a power of two; but heads too wide for 64 rows in 8 MiB (more
            than 32768 float32 or 65536 bfloat16 classes), with more than 256 rows, take 8 MiB
            blocks of up to 2048 rows by as many classes (half precision: 1024 rows, 8 bytes a
            logit); and so does, under autocast, a head whose cast copy would pass 8 MiB (it is
            cast a tile at a time instead).

    The fused path (class-index targets, a 2-D ``linear_weight``, a device the kernels serve) never
    holds more than one chunk of logits and its gradient; see the module docstring for how. Under
    ``torch.autocast`` the matmuls run in the autocast dtype, as ``F.linear``'s would, and the loss
    comes back in float32.
    """
    reduction = _checks.reduction_mode(None, None, reduction, loss=_LOSS)
    weighting = _checks.resolve_class_weighting(class_weighting, loss=_LOSS)
    # the dtype autocast casts F.linear's arguments to, for the dtype checks (bfloat16 hidden states
    # with a float32 head are the usual mixed-precision call); the casts themselves come later, the
    # weight's not at all on class tiles (each tile is cast as it is read)
    autocast_dtype = None
    if isinstance(input, torch.Tensor) and _autocast._autocast_on(input.device.type):
        autocast_dtype = torch.get_autocast_dtype(input.device.type)
    ignore_index = _as_int_or_none(ignore_index, "ignore_index")
    chunk_size = _as_chunk_size(chunk_size)
    num_classes, prob_target = _check_args(input, linear_weight, linear_bias, target, weight, sample_weight,
                                           ignore_index, label_smoothing, chunk_size, autocast_dtype)
    gamma = _checks.check_focal_ce(gamma, label_smoothing, prob_target, loss=_LOSS)
    label_smoothing = float(label_smoothing)
    if not prob_target and ignore_index is None:
        ignore_index = -100
    if not _fused_supported(input, linear_weight, weight, sample_weight, prob_target) or (
        weighting is not None and distributed.sync_active(weighting) and reduction == "none"
    ):
        return _unfused(input, linear_weight, linear_bias, target, weight, reduction, ignore_index,
                        label_smoothing, sample_weight, class_weighting, gamma, return_stats)
    return _fused(input, linear_weight, linear_bias, target, weight, reduction, ignore_index, label_smoothing,
                  sample_weight, weighting, gamma, return_stats, chunk_size, autocast_dtype)


def _unfused(input, linear_weight, linear_bias, target, weight, reduction, ignore_index, label_smoothing,
             sample_weight, class_weighting, gamma, return_stats):
    """The composition itself: the logits in full, then fused_wloss.cross_entropy."""
    if linear_weight.dim() > 2:  # torch's K-dim head: F.linear on the flattened weight
        shape = linear_weight.shape
        logits = F.linear(input, linear_weight.reshape(-1, shape[-1]),
                          None if linear_bias is None else linear_bias.reshape(-1)).reshape(-1, *shape[:-1])
    else:
        logits = F.linear(input, linear_weight, linear_bias)
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing,
                  sample_weight=sample_weight, class_weighting=class_weighting, gamma=gamma,
                  return_stats=return_stats)
    if ignore_index is not None:
        kwargs["ignore_index"] = ignore_index
    if linear_weight.dim() > 2 or input.dim() <= 2:  # cross_entropy's own layouts: (C,), (N, C, d1, ...)
        return functional.cross_entropy(logits, target, **kwargs)
    # (B, T, ..., C): rows of C, flattened, and the loss back in the leading shape
    lead = input.shape[:-1]
    num_classes = linear_weight.shape[0]
    flat_target = target.reshape(-1, num_classes) if target.dtype.is_floating_point else target.reshape(-1)
    if sample_weight is not None:
        kwargs["sample_weight"] = sample_weight.reshape(-1)
    out = functional.cross_entropy(logits.reshape(-1, num_classes), flat_target, **kwargs)
    if reduction != "none":
        return out
    if return_stats:
        return out[0].reshape(lead), out[1]
    return out.reshape(lead)


def _fused(input, linear_weight, linear_bias, target, weight, reduction, ignore_index, label_smoothing,
           sample_weight, weighting, gamma, return_stats, chunk_size, autocast_dtype):
    lead = input.shape[:-1]
    hidden = input.shape[-1]
    num_classes = linear_weight.shape[0]
    x = input.reshape(math.prod(lead), hidden)
    autocast = autocast_dtype is not None
    compute = _autocast_dtype_of(x.dtype, autocast_dtype)
    cast_head = autocast and linear_weight.dtype != compute
    rows, classes = plan_blocks(x.shape[0], num_classes, compute, chunk_size,
                                cast_head_bytes=linear_weight.numel() * compute.itemsize if cast_head else 0)
    lw, lb, compute_dtype = linear_weight, linear_bias, None
    if autocast and classes:
        # class tiles cast a block of rows and a tile of the head as they read them: no copy of the
        # whole weight, or of its gradient, in the autocast dtype
        compute_dtype = compute
    else:  # whole rows read the weight every chunk: cast once, as F.linear under autocast would
        x, lw, lb = _autocast_cast(autocast_dtype, x, linear_weight, linear_bias)
    loss_dtype = torch.float32 if autocast and compute in (torch.float16, torch.bfloat16) else None
    result_dtype = loss_dtype or compute
    acc = _acc_dtype(compute)
    t = target.reshape(-1)
    sw = None if sample_weight is None else sample_weight.reshape(-1)
    n = t.shape[0]
    # before the chunks: the kernels' own check would name cross_entropy and a row of the chunk
    _checks.check_target_range(t, num_classes, ignore_index, loss=_LOSS)

    # What depends on the targets alone, before the first chunk (no pass over logits, no host sync).
    synced = weighting is not None and distributed.sync_active(weighting)
    stats = None
    world = 1
    if weighting is not None or reduction in ("mean", "sample_mean") or return_stats:
        sums = functional._class_sums(t, num_classes, ignore_index, sw, reduction, x.device)
        if synced:
            if sw is not None:
                functional._refuse_sample_weight_grad(sample_weight, _LOSS)
            sums, world = distributed.all_reduce_sum(sums, weighting.process_group)
        counts, class_weight, norm = functional._ce_weights_and_norm(
            sums, num_classes, weight, weighting, reduction, False, sw is not None, acc)
        if return_stats:
            stats = CrossEntropyStats(counts, class_weight.detach(), norm.detach())
        del sums, counts  # C-long: not held through the chunks (peak memory)
    else:
        class_weight = None if weight is None else weight.to(acc)
        norm = torch.ones((), dtype=acc, device=x.device)
    applied = class_weight if (weight is not None or weighting is not None) else None
    if applied is not None:
        applied = applied.detach().to(acc).contiguous()
    if reduction in ("mean", "sample_mean"):
        scale = (world / norm).detach().to(acc)
    else:
        scale = torch.full((), float(world), dtype=acc, device=x.device)
    # the gradients the forward forms: none under no_grad / inference
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and x.requires_grad, grad_on and lw.requires_grad,
             grad_on and lb is not None and lb.requires_grad]
    loss, *_ = torch.ops.fused_wloss.linear_cross_entropy_forward(
        x.contiguous(), lw.contiguous(), None if lb is None else lb.contiguous(), t,
        applied, None if sw is None else sw.detach().to(acc),
        scale, ignore_index, label_smoothing, reduction != "none", gamma, rows, needs, loss_dtype, classes,
        compute_dtype)
    if reduction == "none":
        loss = loss.reshape(lead)
    else:
        if synced and reduction in ("mean", "sample_mean"):
            loss = loss + functional._nan_where_zero(norm.detach()).to(loss.dtype)
        loss = loss.to(result_dtype)
    return (loss, stats) if return_stats else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """The classifier head and the loss in one module, on :func:`linear_cross_entropy`.

    :class:`torch.nn.LinearCrossEntropyLoss`'s constructor and layout: it owns a
    ``torch.nn.Linear(in_features, num_classes * prod(out_features))`` as ``self.linear`` and the
    class weight as the buffer ``weight``, so the ``state_dict`` keys are torch's (``weight``,
    ``linear.weight``, ``linear.bias``) and a model can swap one module for the other. torch's
    ``options`` (its chunking strategy) is accepted and has no effect: the fused path always
    chunks (``chunk_size``). Extra keyword-only arguments: ``class_weighting``, ``gamma`` and
    ``chunk_size``; ``forward(input, target, *, sample_weight=None, return_stats=False)``;
    ``reduction`` also accepts ``"sample_mean"``.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: Tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None, class_weighting=None, gamma: float = 0.0,
                 chunk_size: Union[int, Tuple[int, int], None] = None) -> None:
        super().__init__()
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"{_LOSS}: weight must have shape ({num_classes},), got {_shape(weight.shape)}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
            0.0 <= label_smoothing <= 1.0
        ):
            raise ValueError(f"{_LOSS}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
        chunk_size = _as_chunk_size(chunk_size)
        _check_chunk_size(chunk_size)
        self.register_buffer("weight", weight)
        self.reduction = _checks.reduction_mode(None, None, reduction, loss=_LOSS)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        _checks.resolve_class_weighting(class_weighting, loss=_LOSS)  # fail at construction
        self.class_weighting = class_weighting
        self.gamma = _checks.check_focal_ce(gamma, label_smoothing, prob_target=False, loss=_LOSS)
        self.chunk_size = chunk_size
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)

    def forward(self, input, target, *, sample_weight: Optional[torch.Tensor] = None, return_stats: bool = False):
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = None if self.linear.bias is None else self.linear.bias.reshape(
            (self.num_classes, *self.out_features))
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            sample_weight=sample_weight, class_weighting=self.class_weighting, gamma=self.gamma,
            return_stats=return_stats, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        focal = f", gamma={self.gamma}" if self.gamma else ""
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction!r}, class_weighting={self.class_weighting!r}{focal}")
