"""Segment sums of rows: the combine steps of expert-parallel top-k dispatch.

A :class:`Segments` names, for each row of a source ``[N, C]``, the output row it is added
to (its *group*, as ``index_add``'s index). Top-k dispatch sums rows by segment four times per
step (``moe_dist.parallel.dispatch``): the weighted expert outputs of each received unit, the
returned rows of each sample, and, backward, the pairs' gradients of each unit and the units'
gradients of each sample.

In PyTorch a segment sum is a zero fill and an ``index_add`` (and, weighted, a multiplication;
backward, a gather, two multiplications and a sum): passes over rows that do not fit in cache,
about 15 ms of a 220 ms dispatch step on one core, 7 ms natively (``benchmarks/bench_segments.py``
at ``bench_dispatch.py``'s sizes). The
native kernels (``moe_dist/models/csrc/segments.cpp``) write each output row once from its
segment's rows, located by one stable sort of the group index (a CSR layout). They add the
same float32 terms in the same order as ``index_add`` into zeros (from a zero, so that even a
-0.0 sum is +0.0 as there), so the sums equal the PyTorch path's bit for bit; the weights'
gradient is summed in double. Only the native path's weighted sum refuses a second
derivative (``once_differentiable``); dispatch never takes one. The PyTorch path runs
where the kernels do not (``moe_dist.models.native``: not built, ``MOE_DIST_NATIVE=0``, not
plain float32 CPU tensors).

Shape legend: N source rows; M segments (output rows); C features per row (rows of more
dimensions are flattened); F weight entries; J rows in segment order.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch.autograd.function import once_differentiable

__all__ = ["Segments", "segment_sum", "weighted_segment_sum"]


class Segments:
    """Row n of a source belongs to segment ``group_N[n]`` of ``size`` segments."""

    def __init__(self, group_N: torch.Tensor, size: int) -> None:
        self.group_N = group_N.long()
        self.size = size

    @cached_property
    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ptr [M + 1], order [N])``: segment m's rows are ``order[ptr[m]:ptr[m + 1]]``,
        ascending (a stable sort), the order in which ``index_add`` adds them. Checks that
        every group is a segment (the native kernels index memory with them)."""
        group = self.group_N
        if group.numel() and (int(group.min()) < 0 or int(group.max()) >= self.size):
            raise ValueError(f"segment ids must lie in [0, {self.size}): got {int(group.min())} to {int(group.max())}")
        order_N = torch.argsort(group, stable=True)
        ptr = torch.zeros(self.size + 1, dtype=torch.int64, device=group.device)
        torch.cumsum(torch.bincount(group, minlength=self.size), 0, out=ptr[1:])
        return ptr, order_N


def _library(*tensors: torch.Tensor):
    """The native kernels, if they are built and every tensor is a plain float32 CPU one."""
    # imported here: moe_dist.models imports this package (the MoE module's dispatchers)
    from moe_dist.models import native

    return native.library() if native.plain_cpu_float(*tensors) else None


def _check(src: torch.Tensor, segments: Segments) -> None:
    if src.dim() == 0 or src.shape[0] != segments.group_N.shape[0]:
        raise ValueError(f"{segments.group_N.shape[0]} segment ids for a source of shape {tuple(src.shape)}")


def segment_sum(src: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``dst[m] = sum of src[n] over the rows n of segment m`` (``[M, ...]`` for ``src`` of
    ``[N, ...]``; zeros where a segment is empty). Differentiable: the gradient of a source
    row is its segment's."""
    _check(src, segments)
    lib = _library(src)
    if lib is None:
        return src.new_zeros((segments.size,) + src.shape[1:]).index_add(0, segments.group_N, src)
    return _unflatten(_SegmentSum.apply(_flat(src), segments, lib), src, segments)


def weighted_segment_sum(src: torch.Tensor, w_F: torch.Tensor, entry_N: torch.Tensor,
                         segments: Segments) -> torch.Tensor:
    """``dst[m] = sum of w[entry[n]] * src[n] over the rows n of segment m`` (float32 products
    added in row order; ``src`` ``[N, ...]``, ``w_F`` 1-D). Differentiable in ``src`` and
    ``w_F``; entries of ``w_F`` that no row names get a zero gradient. The rows that name one
    entry must lie in one segment (in dispatch, unit u's weights ``w[u * K + k]`` are named by
    unit u's pairs only): the kernel's threads add to an entry's gradient without locks."""
    _check(src, segments)
    if w_F.dim() != 1 or entry_N.shape != segments.group_N.shape:
        raise ValueError(f"weights must be 1-D and name one entry per source row: got weights "
                         f"{tuple(w_F.shape)}, entries {tuple(entry_N.shape)} for {src.shape[0]} rows")
    lib = _library(src, w_F)
    if lib is None:
        scale = w_F.index_select(0, entry_N).view((-1,) + (1,) * (src.dim() - 1))
        return segment_sum(src * scale, segments)
    if entry_N.numel() and (int(entry_N.min()) < 0 or int(entry_N.max()) >= w_F.shape[0]):
        raise ValueError(f"weight entries must lie in [0, {w_F.shape[0]})")
    return _unflatten(_WeightedSegmentSum.apply(_flat(src), w_F, entry_N, segments, lib), src, segments)


def _flat(src: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` rows as ``[N, C]`` for the kernels."""
    return src if src.dim() == 2 else src.reshape(src.shape[0], math.prod(src.shape[1:]))


def _unflatten(dst_MC: torch.Tensor, src: torch.Tensor, segments: Segments) -> torch.Tensor:
    return dst_MC if src.dim() == 2 else dst_MC.view((segments.size,) + src.shape[1:])


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _native_sum(lib, src_NC: torch.Tensor, segments: Segments, weights=None) -> torch.Tensor:
    """The kernel's forward; ``weights`` = ``(w_F, widx_J)`` with ``widx`` in CSR order."""
    ptr, order_N = segments.csr
    src_NC = src_NC.contiguous()
    dst_MC = src_NC.new_empty((segments.size, src_NC.shape[1]))
    w, widx = weights if weights is not None else (None, None)
    lib.segment_sum(_ptr(src_NC), src_NC.shape[1], _ptr(ptr), _ptr(order_N),
                    None if widx is None else _ptr(widx), None if w is None else _ptr(w),
                    segments.size, _ptr(dst_MC))
    return dst_MC


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_NC: torch.Tensor, segments: Segments, lib) -> torch.Tensor:
        ctx.segments = segments
        return _native_sum(lib, src_NC, segments)

    @staticmethod
    def backward(ctx, grad_MC: torch.Tensor):
        return grad_MC.index_select(0, ctx.segments.group_N), None, None


class _WeightedSegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_NC, w_F, entry_N, segments: Segments, lib):
        src_NC, w_F = src_NC.detach().contiguous(), w_F.detach().contiguous()
        widx_J = entry_N.long().index_select(0, segments.csr[1])
        ctx.save_for_backward(src_NC, w_F, widx_J)
        ctx.segments, ctx.lib = segments, lib  # the library of the forward, whatever the switch says later
        return _native_sum(lib, src_NC, segments, (w_F, widx_J))

    @staticmethod
    @once_differentiable  # backward runs outside autograd: a second derivative raises, never 0
    def backward(ctx, grad_MC: torch.Tensor):
        src_NC, w_F, widx_J = ctx.saved_tensors
        segments = ctx.segments
        ptr, order_N = segments.csr
        grad_MC = grad_MC.contiguous()
        grad_src = torch.empty_like(src_NC)
        grad_w = torch.zeros_like(w_F)
        ctx.lib.segment_sum_backward(_ptr(grad_MC), _ptr(src_NC), src_NC.shape[1], _ptr(ptr), _ptr(order_N),
                                     _ptr(widx_J), _ptr(w_F), segments.size, _ptr(grad_src), _ptr(grad_w))
        return grad_src, grad_w, None, None, None
