"""Segment sums (moe_dist.parallel.segments): the native kernels against PyTorch's
``index_add`` path, which top-k dispatch ran before them and runs where they are not built.

The sums must equal PyTorch's bit for bit (the same float32 terms in the same order), the
source's gradient too; the weights' gradient, summed in double, must be at least as close to
a float64 reference as PyTorch's float32 one. The 2- and 4-rank dispatch tests
(test_dispatch_rows, test_uneven_experts, test_hierarchical) run the kernels end to end.
"""

from __future__ import annotations

import pytest
import torch

from moe_dist.models import native
from moe_dist.parallel.segments import Segments, segment_sum, weighted_segment_sum
from test_native import native_on, needs_compiler  # noqa: F401  (the kernels on, whatever the environment says)
C = 37  # not a whole vector: the kernels' tails


def _groups(n: int, m: int, seed: int = 0) -> torch.Tensor:
    """A group index over m segments: most of 1-2 rows, one of 3, some empty."""
    g = torch.Generator().manual_seed(seed)
    group = torch.randint(0, m - 3, (n,), generator=g)  # the last 3 segments stay empty ...
    group[:3] = m - 4  # ... and segment m - 4 has at least 3 rows
    return group[torch.randperm(n, generator=g)]


def _pytorch_path(monkeypatch, fn, *args):
    monkeypatch.setenv("MOE_DIST_NATIVE", "0")
    try:
        return fn(*args)
    finally:
        monkeypatch.setenv("MOE_DIST_NATIVE", "1")


def test_segments_list_each_segments_rows_in_ascending_order():
    group = torch.tensor([2, 0, 2, 2, 0])
    ptr, order = Segments(group, 4).csr
    assert ptr.tolist() == [0, 2, 2, 5, 5]
    assert order.tolist() == [1, 4, 0, 2, 3]


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
def test_segment_sum_equals_index_add_bit_for_bit(monkeypatch, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, m = 3000, 2200  # 2200 x 37 floats: over the kernels' one-thread limit
        src = torch.randn(n, C, requires_grad=True)
        segments = Segments(_groups(n, m), m)
        out = segment_sum(src, segments)
        assert out.grad_fn.name().startswith("_SegmentSum")  # the native path ran
        cot = torch.randn(m, C)
        (grad,) = torch.autograd.grad(out, src, cot)
        src_ref = src.detach().clone().requires_grad_(True)
        ref = _pytorch_path(monkeypatch, segment_sum, src_ref, segments)
        assert torch.equal(out, ref)
        assert torch.equal(out[-3:], torch.zeros(3, C))  # empty segments
        assert torch.equal(grad, torch.autograd.grad(ref, src_ref, cot)[0])
    finally:
        torch.set_num_threads(before)


@needs_compiler
@pytest.mark.parametrize("m, threads", [(300, 1), (3000, 3)])  # 3000 x 37: the kernels' threaded branch
def test_weighted_segment_sum_equals_pytorch_and_its_weight_gradient_is_closer(m, threads):
    n, k = m * 5 // 3, 2
    g = torch.Generator().manual_seed(1)
    src64 = torch.randn(n, C, generator=g, dtype=torch.float64) * 1e3 + 1.0  # a shifted scale
    w64 = torch.rand(m * k, generator=g, dtype=torch.float64)
    group = _groups(n, m, seed=2)
    entry = group * k + torch.randint(0, k, (n,), generator=g)  # entries repeat within a segment
    cot64 = torch.randn(m, C, generator=g, dtype=torch.float64)
    segments = Segments(group, m)

    def run(dtype, use_native: bool):
        src = src64.to(dtype).requires_grad_(True)
        w = w64.to(dtype).requires_grad_(True)
        if use_native:
            out = weighted_segment_sum(src, w, entry, segments)
            assert out.grad_fn.name().startswith("_WeightedSegmentSum")  # the native path ran
        else:  # PyTorch's path, as dispatch ran it before the kernels
            out = src.new_zeros((m, C)).index_add(0, group, src * w.index_select(0, entry).unsqueeze(1))
        return (out, *torch.autograd.grad(out, (src, w), cot64.to(dtype)))

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grad_src, grad_w = run(torch.float32, True)
    finally:
        torch.set_num_threads(before)
    ref, ref_src, ref_w = run(torch.float32, False)
    _, _, exact_w = run(torch.float64, False)
    assert torch.equal(out, ref) and torch.equal(grad_src, ref_src)
    named = torch.zeros(m * k, dtype=torch.bool).index_fill_(0, entry, True)
    assert torch.equal(grad_w[~named], torch.zeros(int((~named).sum())))  # entries no row names
    error = (grad_w.double() - exact_w).abs().max() / exact_w.abs().max()
    error_ref = (ref_w.double() - exact_w).abs().max() / exact_w.abs().max()
    assert error <= max(error_ref, 1e-7), (error, error_ref)


@needs_compiler
def test_a_negative_zero_sums_to_a_positive_one_as_index_add_gives():
    src = torch.tensor([[-0.0, 1.0], [2.0, -0.0]])
    group = torch.tensor([0, 1])
    out = segment_sum(src, Segments(group, 2))
    weighted = weighted_segment_sum(torch.tensor([[-1.0, 1.0]]), torch.zeros(1), torch.tensor([0]),
                                    Segments(torch.tensor([0]), 1))
    assert not torch.signbit(out).any() and not torch.signbit(weighted).any()


@needs_compiler
@pytest.mark.parametrize("weighted", [False, True])
def test_rows_of_any_shape_and_both_paths_agree(monkeypatch, weighted):
    """Dispatch's rows are whatever the experts take (images [B, 1, 28, 28] for the papers' CNN
    experts): the sums keep the trailing shape, as index_add does."""
    src = torch.randn(5, 1, 4, 3, requires_grad=True)
    segments = Segments(torch.tensor([2, 0, 2, 1, 0]), 3)
    w, entry = torch.rand(5, requires_grad=True), torch.tensor([4, 0, 3, 1, 2])

    def run():
        out = weighted_segment_sum(src, w, entry, segments) if weighted else segment_sum(src, segments)
        return (out, *torch.autograd.grad(out.square().sum(), (src, w) if weighted else (src,)))

    native_out = run()
    reference = _pytorch_path(monkeypatch, run)
    assert native_out[0].shape == (3, 1, 4, 3)
    for a, b in zip(native_out, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@needs_compiler
def test_the_switch_turned_off_between_forward_and_backward_keeps_the_forwards_path(monkeypatch):
    src, w = torch.randn(4, C, requires_grad=True), torch.rand(4, requires_grad=True)
    out = weighted_segment_sum(src, w, torch.arange(4), Segments(torch.tensor([0, 0, 1, 1]), 2))
    monkeypatch.setenv("MOE_DIST_NATIVE", "0")
    out.sum().backward()
    torch.testing.assert_close(w.grad, src.detach().sum(1))


@needs_compiler
def test_inconsistent_sizes_are_refused_before_any_memory_is_read():
    segments = Segments(torch.tensor([0, 0, 1]), 2)
    with pytest.raises(ValueError, match="3 segment ids for a source of shape"):
        segment_sum(torch.randn(2, C), segments)
    with pytest.raises(ValueError, match=r"segment ids must lie in \[0, 2\)"):
        segment_sum(torch.randn(3, C), Segments(torch.tensor([0, 5, 1]), 2))
    with pytest.raises(ValueError, match=r"weight entries must lie in \[0, 2\)"):
        weighted_segment_sum(torch.randn(3, C), torch.rand(2), torch.tensor([0, 1, 2]), segments)
    with pytest.raises(ValueError, match="weights must be 1-D and name one entry per source row"):
        weighted_segment_sum(torch.randn(3, C), torch.rand(2), torch.tensor([0, 1]), segments)


@needs_compiler
def test_weighted_segment_sum_has_no_second_derivative():
    src = torch.randn(4, C, requires_grad=True)
    w = torch.rand(4, requires_grad=True)
    out = weighted_segment_sum(src, w, torch.arange(4), Segments(torch.tensor([0, 0, 1, 1]), 2))
    (grad_w,) = torch.autograd.grad(out.square().sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_w.sum().backward()


def test_other_dtypes_and_the_switch_take_the_pytorch_path(monkeypatch):
    group = torch.tensor([1, 0, 1])
    src = torch.randn(3, C, dtype=torch.float64, requires_grad=True)
    out = segment_sum(src, Segments(group, 3))
    assert out.grad_fn.name().startswith("IndexAdd")
    assert torch.equal(out, torch.stack([src[1], src[0] + src[2], torch.zeros(C, dtype=torch.float64)]).detach())
    monkeypatch.setenv("MOE_DIST_NATIVE", "0")
    assert segment_sum(src.float(), Segments(group, 3)).grad_fn.name().startswith("IndexAdd")


@needs_compiler
def test_no_rows_give_zero_segments_and_no_segments_an_empty_sum():
    empty = segment_sum(torch.zeros(0, C), Segments(torch.zeros(0, dtype=torch.int64), 4))
    assert torch.equal(empty, torch.zeros(4, C))
    src, w = torch.zeros(0, C, requires_grad=True), torch.rand(3, requires_grad=True)
    no_ids = torch.zeros(0, dtype=torch.int64)
    none = weighted_segment_sum(src, w, no_ids, Segments(no_ids, 2))
    assert torch.equal(none, torch.zeros(2, C))
    none.sum().backward()
    assert src.grad.shape == (0, C) and torch.equal(w.grad, torch.zeros(3))
