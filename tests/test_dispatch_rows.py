"""Top-k expert-parallel dispatch sends each sample's row once per destination rank, and
gets one combined row back per such unit.

E = 5 FFN experts on 2 and 4 ranks (blocks 3 + 2 and 2 + 1 + 1 + 1), top-2 and top-3, random
and biased routings, with and without a capacity factor. Each rank counts the rows it really
sends (a wrapper around ``dist.all_to_all_single``); here the test recomputes from each
rank's routing the least any dispatch must send (the distinct (sample, other rank) pairs of
its kept choices), checks that the rows sent and the rows returned are both that minimum,
and checks outputs, input and gate gradients (through the gate weights, which travel with
the rows) and, in eval mode, the top-1 outputs against one process on each rank's share
(capacity is per rank's share, so that is the reference in both cases).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_dist.models import MoE
from moe_dist.models.ffn import FFNExpertBank
from moe_dist.parallel.dispatch import capacity_keep, routing_capacity
from moe_dist.parallel.groups import expert_blocks
from procs import spawn

E, HIDDEN, FFN = 5, 8, 16
SIZES = {2: (9, 6), 4: (5, 0, 7, 3)}  # uneven shares, one rank without samples
# (name, top_k, capacity factor, gate bias): "pair" sends every sample to experts 0 and 1,
# which sit together on rank 0 in both layouts
CASES = (("random", 2, 0.0, None), ("random_cf", 2, 0.6, None), ("top3", 3, 0.0, None),
         ("top3_cf", 3, 0.8, None), ("pair", 2, 0.0, (9.0, 9.0, -9.0, -9.0, -9.0)))
STAT_KEYS = {"routed", "dropped", "expert_rows", "padded_rows", "remote_rows_sent", "min_remote_rows",
             "remote_rows_returned"}


def make_layer(top_k: int, capacity_factor: float, bias) -> MoE:
    torch.manual_seed(0)
    gate = torch.nn.Linear(HIDDEN, E)
    if bias is not None:
        with torch.no_grad():
            gate.bias.copy_(torch.tensor(bias))
    return MoE(FFNExpertBank.create(E, hidden_size=HIDDEN, ffn_size=FFN), gate, routing="topk", top_k=top_k,
               output_kind="logits", capacity_factor=capacity_factor)


def inputs(world: int):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(n, HIDDEN, generator=g), torch.randn(n, HIDDEN, generator=g)) for n in SIZES[world]]


def rows_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    from moe_dist.parallel import ParallelContext, parallelize

    ctx = ParallelContext.create(ep_size=world, num_experts=E)
    x, cot = inputs(world)[rank]
    original = dist.all_to_all_single
    calls: list[tuple[torch.dtype, int]] = []

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        me = dist.get_rank(group)
        splits = input_split_sizes or [input.shape[0] // dist.get_world_size(group)] * dist.get_world_size(group)
        calls.append((input.dtype, sum(splits) - splits[me]))
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    try:
        for name, top_k, cf, bias in CASES:
            layer = parallelize(make_layer(top_k, cf, bias), ctx)
            xi = x.clone().requires_grad_(True)
            calls.clear()
            out = layer(xi)
            forward_calls = list(calls)
            (out.output * cot).sum().backward()
            layer.eval()
            calls.clear()
            with torch.no_grad():
                evaluated = layer(x)
            torch.save({"output": out.output.detach(), "dx": xi.grad, "index": out.expert_index,
                        "dgate": [p.grad for p in layer.gate.parameters()], "top": out.top_expert_output,
                        "eval_output": evaluated.output, "eval_top": evaluated.top_expert_output,
                        "stats": out.routing_stats, "forward_calls": forward_calls, "eval_calls": list(calls)},
                       Path(out_dir) / f"w{world}_{name}_rank{rank}.pt")
    finally:
        dist.all_to_all_single = original


@pytest.fixture(scope="module")
def rows_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("rows")
    for world in SIZES:
        spawn(rows_worker, world, str(out))
    return out


def minimum_rows(index_BK: torch.Tensor, keep_BK: torch.Tensor, owner: list[int], me: int) -> int:
    """Distinct (sample, other rank) among the kept choices, counted one sample at a time."""
    return sum(len({owner[e] for e, kept in zip(row, keep) if kept} - {me})
               for row, keep in zip(index_BK.tolist(), keep_BK.tolist()))


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", sorted(SIZES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rows_sent_are_the_per_rank_minimum(rows_runs, world, case):
    name, top_k, cf, bias = case
    owner = [r for r, block in enumerate(expert_blocks(E, world)) for _ in block]
    reference = make_layer(top_k, cf, bias)
    total_pairs = 0
    for rank, (x, cot) in enumerate(inputs(world)):
        rec = torch.load(rows_runs / f"w{world}_{name}_rank{rank}.pt")
        xi = x.clone().requires_grad_(True)
        ref = reference(xi)
        (ref.output * cot).sum().backward()
        torch.testing.assert_close(rec["output"], ref.output.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec["dx"], xi.grad, rtol=1e-5, atol=1e-6)
        for got, p in zip(rec["dgate"], reference.gate.parameters()):  # through the sent weights
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)
            p.grad = None
        reference.eval()
        with torch.no_grad():
            ref_eval = reference(x)
        reference.train()
        assert rec["top"] is None  # training: the weighted sums only
        torch.testing.assert_close(rec["eval_output"], ref_eval.output, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec["eval_top"], ref_eval.top_expert_output, rtol=1e-5, atol=1e-6)
        assert torch.equal(rec["index"], ref.expert_index)
        B = x.shape[0]
        keep = (capacity_keep(ref.expert_index, E, routing_capacity(cf, B * top_k, E)).view(B, top_k)
                if cf > 0 else torch.ones(B, top_k, dtype=torch.bool))
        stats = rec["stats"]
        assert set(stats) == STAT_KEYS
        least = minimum_rows(ref.expert_index, keep, owner, rank)
        # forward exchanges: counts, routing metadata, token rows, gate weights, output rows
        for calls in (rec["forward_calls"], rec["eval_calls"]):
            dtypes = [dtype for dtype, _ in calls]
            assert dtypes == [torch.int64, torch.int8, torch.float32, torch.float32, torch.float32], dtypes
            assert calls[2][1] == calls[3][1] == least  # the token rows (and weights) this rank sent
        assert stats["min_remote_rows"] == stats["remote_rows_sent"] == stats["remote_rows_returned"] == least
        assert stats["routed"] == B * top_k and stats["dropped"] == int((~keep).sum())
        assert stats["padded_rows"] == stats["expert_rows"]  # ragged FFN rows: no padding
        total_pairs += int(keep.sum())
    records = [torch.load(rows_runs / f"w{world}_{name}_rank{r}.pt") for r in range(world)]
    assert sum(r["stats"]["expert_rows"] for r in records) == total_pairs
    # outputs go back from the experts' ranks, as the rows they really send: one per unit
    for calls in ("forward_calls", "eval_calls"):
        assert sum(r[calls][4][1] for r in records) == sum(r["stats"]["remote_rows_returned"] for r in records)
    remote_pairs = sum(sum(owner[e] != rank for e in r["index"].view(-1).tolist())
                       for rank, r in enumerate(records))
    if name == "pair" or (world == 2 and name == "random"):
        # some samples have both experts on one other rank: one row there and one row back,
        # fewer than the remote (sample, expert) pairs
        assert sum(r["stats"]["remote_rows_returned"] for r in records) < remote_pairs


def test_ffn_grouped_kernel_backpropagates_through_output_and_hidden():
    """The CPU kernel's hand-written backward (in-place ReLU mask, per-expert slices, an
    expert without rows) against the separate expert modules, float64, a loss that uses both
    the output and the hidden state."""
    torch.manual_seed(0)
    bank = FFNExpertBank.create(3, hidden_size=HIDDEN, ffn_size=FFN).double()
    modules = [m.double() for m in bank.to_modules()]
    experts = [0] * 4 + [2] * 6  # expert 1 gets no row
    x = torch.randn(len(experts), HIDDEN, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, hidden = bank.forward_grouped(xa, torch.tensor([4, 0, 6]))
    (out.pow(2).sum() + hidden.pow(3).sum()).backward()
    pieces = [modules[e](xb[i:i + 1]) for i, e in enumerate(experts)]
    sum(o.pow(2).sum() + h.pow(3).sum() for o, h in pieces).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for name, p in bank.named_parameters():
        reference = [dict(m.named_parameters())[name].grad for m in modules]
        reference = torch.stack([g if g is not None else torch.zeros_like(p[0]) for g in reference])
        torch.testing.assert_close(p.grad, reference, msg=lambda m: f"{name}: {m}")
    assert bank.fc1.weight.grad[1].abs().sum() == 0
