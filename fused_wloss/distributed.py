"""Class counts synchronised across a ``torch.distributed`` process group.

``BatchWeighting(..., sync=True, process_group=None)`` makes the dynamic weights of every rank come
from the counts of the global batch (the concatenation of the ranks' local batches). This module
holds the collective; :mod:`fused_wloss.functional` forms the loss around it.

The contract. DistributedDataParallel averages gradients: each rank's loss ``L_r`` gives the
parameters ``(1/R) sum_r dL_r``, ``R`` the world size. With ``sync=True`` each rank returns

    ``"mean"``, ``"sample_mean"``:  L_r = R * (sum of rank r's weighted element losses) / normaliser
    ``"sum"``:                      L_r = R * (sum of rank r's weighted element losses)
    ``"none"``:                     rank r's element losses, weighted with the global weights

where the class weights and the normaliser are those of the global batch. So the averaged gradient
(and the mean of ``L_r`` over the ranks, which is what ``self.log(..., sync_dist=True)`` reports)
is the gradient (and the value) of the single-process loss on the global batch. A single rank's
value alone is its share scaled by ``R``, not a loss of its own batch.

How. Each rank forms a short float64 vector from its targets (N integers for class-index targets:
no pass over the logits): the per-class counts, the per-class sums of ``sample_weight`` when
``"mean"`` needs them, and the element counts. One ``all_reduce`` (sum) over the group; then the
weights and the normaliser are formed from the sums, and the fused kernel runs once over the logits
with the weights as static class weights and reduction ``"sum"``. float64 keeps counts exact far
beyond float32's 2^24.

Gradients: the logits get the global gradient as described; so does a static ``weight`` that
requires grad (a learned class weight, itself a DDP parameter), the normaliser of ``"mean"``
included. A ``sample_weight`` that requires grad is refused with a ValueError: its gradient would
need the other ranks' losses. The counts carry no gradient, as ``torch.bincount``'s.

Every rank joins the one collective on every call, whatever its batch holds: the vector's length
depends only on the number of classes (labels), which all ranks share, so an empty local batch or
a batch that lacks a class cannot deadlock. All ranks must make the same calls in the same order,
as for any collective.

torch.compile. ``torch.distributed.all_reduce`` is traced by Dynamo (as a functional collective),
so a loss with ``sync=True`` compiles with ``fullgraph=True`` (tested with the ``aot_eager`` and
``inductor`` backends on gloo). Without an initialised process group, ``sync=True`` counts the local
batch, so the same code runs in one process.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from ._weighting import BatchWeighting

__all__ = ["all_reduce_sum", "sync_active"]


def sync_active(weighting: BatchWeighting) -> bool:
    """Whether a call with this weighting sums its counts across a process group."""
    return weighting.sync and dist.is_available() and dist.is_initialized()


def all_reduce_sum(local: torch.Tensor, process_group=None) -> Tuple[torch.Tensor, int]:
    """Sum ``local`` over the group (a new tensor; ``local`` is left alone) and the group's size.

    On CUDA with NCCL the collective is queued on the device like a kernel: no host round trip.
    """
    total = local.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
    return total, dist.get_world_size(process_group)
