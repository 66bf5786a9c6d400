"""Collectives with autograd, over process groups, for tensors whose row counts differ by rank.

Gradient convention (the one the whole package relies on): every rank's loss is its *share*
of the global loss, ``L = sum_r L_r``, and each collective's backward is its exact adjoint:

* ``all_reduce_sum``: y_r = sum_s x_s on every rank, so dL/dx_s = sum_r dL/dy_r: the
  backward is again an all-reduce (as in ``torch.distributed.nn``);
* ``all_gather_rows``: y_r = cat_s x_s, so dL/dx_s = sum_r (dL/dy_r)[rows of s]: a
  reduce-scatter, done here with one all-to-all and a local sum (gloo has no reduce_scatter);
* ``all_to_all_rows``: a permutation of rows across ranks; the backward sends the gradients
  back along the reverse splits.

A parameter replicated on several ranks then gets ``dL/dtheta = sum_r dL/dtheta_r``: the
gradient reduction *sums* (``moe_dist.parallel.grads``). Every collective here is called by
every rank of its group, with zero rows if need be, so no rank can wait forever.

``group=None`` is the default (world) group. ``kind`` says under which heading of
``moe_dist.parallel.traffic`` the bytes sent (forward and backward) are counted.

Why not ``torch.distributed.nn.functional``: in torch 2.13 its ``all_reduce`` and
``all_to_all_single`` warn on every call that they are deprecated in favour of the private
``torch.distributed._functional_collectives``, and it has no all-gather of blocks of
different lengths; these few autograd Functions are the exact adjoints the tests check.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from moe_dist.parallel.traffic import count_all_gather, count_all_reduce, count_all_to_all

__all__ = ["all_reduce_sum", "all_reduce_max", "all_gather_rows", "all_to_all_rows",
           "all_to_all_counts", "exchange_rows", "group_size"]


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def _all_to_all(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                group: dist.ProcessGroup | None, kind: str) -> torch.Tensor:
    x = x.contiguous()
    count_all_to_all(kind, x, in_splits, group)
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, kind: str):
        ctx.group, ctx.kind = group, kind
        return _sum(x, group, kind)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sum(grad, ctx.group, ctx.kind), None, None


def _sum(x: torch.Tensor, group, kind: str) -> torch.Tensor:
    out = x.clone()
    count_all_reduce(kind, out, group)
    dist.all_reduce(out, group=group)
    return out


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None = None, kind: str = "other") -> torch.Tensor:
    """Sum over the group's ranks; differentiable (backward: all-reduce of the gradients)."""
    if not x.requires_grad:
        return _sum(x, group, kind)
    return _AllReduceSum.apply(x, group, kind)


@torch.no_grad()
def all_reduce_max(x: torch.Tensor, group: dist.ProcessGroup | None = None, kind: str = "other") -> torch.Tensor:
    """Elementwise maximum over the group's ranks (no gradient)."""
    out = x.detach().clone()
    count_all_reduce(kind, out, group)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def _gather_padded(x: torch.Tensor, sizes: Sequence[int], group, kind: str) -> torch.Tensor:
    """all_gather of row blocks of different lengths: pad each to the longest, gather, strip."""
    longest = max(sizes)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in sizes]
    count_all_gather(kind, padded, group)
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], index: int, group, kind: str):
        ctx.sizes, ctx.index, ctx.group, ctx.kind = sizes, index, group, kind
        return _gather_padded(x, sizes, group, kind)

    @staticmethod
    def backward(ctx, grad_G: torch.Tensor):
        n = ctx.sizes[ctx.index]
        # rank s receives every rank's gradient for its own rows and sums them
        recv = _all_to_all(grad_G, [n] * len(ctx.sizes), ctx.sizes, ctx.group, ctx.kind)
        grad = recv.view(len(ctx.sizes), n, *grad_G.shape[1:]).sum(0)
        return grad, None, None, None, None


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int], index: int,
                    group: dist.ProcessGroup | None = None, kind: str = "other") -> torch.Tensor:
    """Concatenate the row blocks of all ranks of ``group`` in rank order.

    ``sizes[i]`` is the row count of the group's i-th rank and ``index`` this rank's position
    in the group. Differentiable when ``x`` requires grad (backward: reduce-scatter).
    """
    sizes = tuple(int(s) for s in sizes)
    if x.shape[0] != sizes[index]:
        raise ValueError(f"this rank has {x.shape[0]} rows but sizes[{index}] = {sizes[index]}")
    if not x.requires_grad:
        return _gather_padded(x, sizes, group, kind)
    return _AllGatherRows.apply(x, sizes, index, group, kind)


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: tuple[int, ...], in_splits: tuple[int, ...], group, kind: str):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.kind = out_splits, in_splits, group, kind
        return _all_to_all(x, out_splits, in_splits, group, kind)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group, ctx.kind), None, None, None, None


def all_to_all_rows(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                    group: dist.ProcessGroup | None = None, kind: str = "other") -> torch.Tensor:
    """Send rows ``in_splits[j]`` (consecutive, in order) to rank j of the group; receive
    ``out_splits[j]`` rows from rank j, concatenated in rank order. Differentiable."""
    out_splits = tuple(int(s) for s in out_splits)
    in_splits = tuple(int(s) for s in in_splits)
    if not x.requires_grad:
        return _all_to_all(x, out_splits, in_splits, group, kind)
    return _AllToAllRows.apply(x, out_splits, in_splits, group, kind)


def exchange_rows(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                  group: dist.ProcessGroup | None = None, kind: str = "other") -> torch.Tensor:
    """``all_to_all_rows`` without autograd, for autograd Functions that write their own
    backward (``moe_dist.parallel.dispatch``): ``out_splits`` and ``in_splits`` are ints."""
    return _all_to_all(x, out_splits, in_splits, group, kind)


def all_to_all_counts(counts_PE: torch.Tensor, group: dist.ProcessGroup | None = None,
                      kind: str = "other") -> torch.Tensor:
    """Exchange per-destination count rows: row j of ``counts_PE`` goes to rank j; the result's
    row j is what rank j sent to this rank. Shape ``[P, ...]`` in and out, P = group size."""
    counts_PE = counts_PE.contiguous()
    count_all_to_all(kind, counts_PE, None, group)
    out = torch.empty_like(counts_PE)
    dist.all_to_all_single(out, counts_PE, group=group)
    return out
