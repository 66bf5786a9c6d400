"""Segment sums of rows: the combine steps of expert-parallel top-k dispatch.

A :class:`Segments` names, for each row of a source ``[N, C]``, the output row it is added
to (its *group*, as ``index_add``'s index). Top-k dispatch sums rows by segment four times per
step (``moe_dist.parallel.dispatch``): the weighted expert outputs of each received unit, the
returned rows of each sample, and, backward, the pairs' gradients of each unit and the units'
gradients of each sample.

In PyTorch a segment sum is a zero fill and an ``index_add`` (and, weighted, a multiplication;
backward, a gather, two multiplications and a sum): passes over rows that do not fit in cache,
about 9 ms of a 220 ms dispatch step on one core (``benchmarks/bench_dispatch.py``). The
native kernels (``moe_dist/models/csrc/segments.cpp``) write each output row once from its
segment's rows, located by one stable sort of the group index (a CSR layout). They add the
same float32 terms in the same order as ``index_add`` into zeros, so the sums equal the
PyTorch path's bit for bit; the weights' gradient is summed in double. The PyTorch path runs
where the kernels do not (``moe_dist.models.native``: not built, ``MOE_DIST_NATIVE=0``, not
plain float32 CPU tensors).

Shape legend: N source rows; M segments (output rows); C features; F weight entries.
"""

from __future__ import annotations

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
        ascending (a stable sort), the order in which ``index_add`` adds them."""
        order_N = torch.argsort(self.group_N, stable=True)
        ptr = torch.zeros(self.size + 1, dtype=torch.int64, device=self.group_N.device)
        torch.cumsum(torch.bincount(self.group_N, minlength=self.size), 0, out=ptr[1:])
        return ptr, order_N


def _library(*tensors: torch.Tensor):
    """The native kernels, if they are built and every tensor is a plain float32 CPU one."""
    # imported here: moe_dist.models imports this package (the MoE module's dispatchers)
    from moe_dist.models import native

    return native.library() if native._plain_cpu_float(*tensors) else None


def segment_sum(src_NC: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``dst[m] = sum of src[n] over the rows n of segment m`` (``[M, C]``; zeros where a
    segment is empty). Differentiable: the gradient of a source row is its segment's."""
    if _library(src_NC) is None:
        return src_NC.new_zeros((segments.size, src_NC.shape[1])).index_add(0, segments.group_N, src_NC)
    return _SegmentSum.apply(src_NC, segments)


def weighted_segment_sum(src_NC: torch.Tensor, w_F: torch.Tensor, entry_N: torch.Tensor,
                         segments: Segments) -> torch.Tensor:
    """``dst[m] = sum of w[entry[n]] * src[n] over the rows n of segment m`` (float32 products
    added in row order). Differentiable in ``src_NC`` and ``w_F``; entries of ``w_F`` that no
    row names get a zero gradient. The rows that name one entry must lie in one segment (in
    dispatch, unit u's weights ``w[u * K + k]`` are named by unit u's pairs only): the
    kernel's threads add to an entry's gradient without locks."""
    if _library(src_NC, w_F) is None:
        return segment_sum(src_NC * w_F.index_select(0, entry_N).unsqueeze(1), segments)
    return _WeightedSegmentSum.apply(src_NC, w_F, entry_N, segments)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _native_sum(src_NC: torch.Tensor, segments: Segments, weights=None) -> torch.Tensor:
    """The kernel's forward; ``weights`` = ``(w_F, widx_J)`` with ``widx`` in CSR order."""
    ptr, order_N = segments.csr
    src_NC = src_NC.contiguous()
    dst_MC = src_NC.new_empty((segments.size, src_NC.shape[1]))
    widx, w = (weights[1], weights[0]) if weights is not None else (None, None)
    _library().segment_sum(_ptr(src_NC), src_NC.shape[1], _ptr(ptr), _ptr(order_N),
                                 None if widx is None else _ptr(widx), None if w is None else _ptr(w),
                                 segments.size, _ptr(dst_MC))
    return dst_MC


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_NC: torch.Tensor, segments: Segments) -> torch.Tensor:
        ctx.segments = segments
        return _native_sum(src_NC, segments)

    @staticmethod
    def backward(ctx, grad_MC: torch.Tensor):
        return grad_MC.index_select(0, ctx.segments.group_N), None


class _WeightedSegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_NC, w_F, entry_N, segments: Segments):
        src_NC, w_F = src_NC.detach().contiguous(), w_F.detach().contiguous()
        widx_J = entry_N.long().index_select(0, segments.csr[1])
        ctx.save_for_backward(src_NC, w_F, widx_J)
        ctx.segments = segments
        return _native_sum(src_NC, segments, (w_F, widx_J))

    @staticmethod
    @once_differentiable  # backward runs outside autograd: a second derivative raises, never 0
    def backward(ctx, grad_MC: torch.Tensor):
        src_NC, w_F, widx_J = ctx.saved_tensors
        segments = ctx.segments
        ptr, order_N = segments.csr
        grad_MC = grad_MC.contiguous()
        grad_src = torch.empty_like(src_NC)
        grad_w = torch.zeros_like(w_F)
        _library().segment_sum_backward(_ptr(grad_MC), _ptr(src_NC), src_NC.shape[1], _ptr(ptr),
                                              _ptr(order_N), _ptr(widx_J), _ptr(w_F), segments.size,
                                              _ptr(grad_src), _ptr(grad_w))
        return grad_src, grad_w, None, None
