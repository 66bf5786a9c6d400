"""Gradient reduction without DDP (docs/design.md, choice 5).

Every rank's loss is its share of the global loss and the collectives of the forward pass
have exact adjoints (``collectives``), so after ``backward`` rank r holds dL/dtheta_r for its
copy of each parameter; the single-process gradient of a replicated parameter is the *sum*
of those over its copies. Replicated parameters are summed over the world, sharded expert
parameters over their expert-data-parallel group (the ranks that hold the same experts:
the same ``ep_rank``, hence the same block of global ids and the same shapes, also when the
blocks of an EP group differ in size).
Nothing is averaged, so the scaling is right by construction; the equivalence tests prove
it against one process on the concatenated batch.

DDP is not used: it would all-reduce the expert parameters across the expert-parallel
group, mixing different experts.

Gradients are flattened into buckets (one all-reduce per bucket, per dtype and group). A
parameter whose gradient is None on every rank stays None (as in one process, where the
optimizer then skips it); one that has a gradient on some rank gets the sum, zeros elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_dist.parallel.groups import ParallelContext
from moe_dist.parallel.model import split_parameters
from moe_dist.parallel.traffic import count_all_reduce

__all__ = ["GradientReducer", "all_reduce_gradients"]

BUCKET_BYTES = 25 * 2**20


def all_reduce_gradients(params: list[nn.Parameter], group: dist.ProcessGroup | None,
                         bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum the gradients of ``params`` over ``group`` in place (None: the world)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    # Which parameters have a gradient anywhere: one flag per parameter, summed with the first
    # bucket, so that the ranks agree without an extra round trip.
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                           device=params[0].device)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    buckets: list[list[nn.Parameter]] = []
    for same in by_dtype.values():
        bucket: list[nn.Parameter] = []
        size = 0
        for p in same:
            if bucket and size + p.grad.numel() * p.grad.element_size() > bucket_bytes:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
        buckets.append(bucket)
    for i, bucket in enumerate(buckets):
        grads = [p.grad for p in bucket]
        flat = _flatten_dense_tensors(grads)
        if i == 0:
            flat = torch.cat([flat, present.to(flat.dtype)])
        count_all_reduce("gradients", flat, group)
        dist.all_reduce(flat, group=group)
        if i == 0:
            present = flat[-present.numel():]
            flat = flat[: -present.numel()]
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
    for p, flag in zip(params, present.tolist()):
        if flag == 0:
            p.grad = None


class GradientReducer:
    """Sums a model's gradients as its parallel layout requires; call after ``backward``."""

    def __init__(self, model: nn.Module, ctx: ParallelContext, bucket_bytes: int = BUCKET_BYTES):
        self.ctx = ctx
        self.replicated, self.sharded = split_parameters(model, ctx)
        self.bucket_bytes = bucket_bytes

    @torch.no_grad()
    def __call__(self) -> None:
        if not self.ctx.distributed:
            return
        all_reduce_gradients(self.replicated, self.ctx.dp_group, self.bucket_bytes)
        if self.ctx.edp_group is not None:
            all_reduce_gradients(self.sharded, self.ctx.edp_group, self.bucket_bytes)
