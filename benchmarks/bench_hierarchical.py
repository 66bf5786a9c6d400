"""Benchmark hierarchical routing against flat top-k over the same experts, under expert parallelism.

Two gloo processes (one thread each), ep_size 2, a token-level layer of E = 20 FFN experts
(hidden 256, FFN 1024), 4096 tokens per rank, both sides dropless:

* ``flat``: ``moe.routing=topk``, top-2 of the 20 experts (the experts of a token may sit
  on both ranks);
* ``hierarchical``: ``moe.routing=hierarchical``, 4 groups of 5 experts, the top group and
  the top-2 experts inside it; a group lives on one rank (``placement_unit``), so a token
  reaches at most one other rank.

Both run 2 experts per token: the same expert FLOPs. Reported: forward+backward step time
(median over steps, the slower rank's time per step), and per step and rank: the rows the
routing statistics say were sent to the other rank (``remote_rows_sent``), the routing's
minimum (``min_remote_rows``: each token once to each other rank holding one of its chosen
experts), and the all-to-all bytes measured by wrapping ``torch.distributed.all_to_all_single``
(forward and backward, counts included). The gates are random (untrained): a token's two
flat experts share a rank about half the time.

Run: ``python benchmarks/bench_hierarchical.py`` (a minute or two on 2 idle CPU cores);
``--quick`` for a smoke run; ``--json FILE`` to save the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import moe_dist  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_dispatch import ByteCounter, run_two_ranks  # noqa: E402

HIDDEN, FFN, EP = 256, 1024, 2
EXPERTS, GROUPS, TOP_GROUPS, TOP_K = 20, 4, 1, 2


def build_layers() -> dict:
    """The flat and the hierarchical layer, same experts (same seed), each parallelized."""
    from moe_dist.models import MoE
    from moe_dist.models.ffn import FFNExpertBank
    from moe_dist.models.gates import HierarchicalGate
    from moe_dist.parallel import ParallelContext, parallelize

    layers = {}
    torch.manual_seed(0)
    flat = MoE(FFNExpertBank.create(EXPERTS, hidden_size=HIDDEN, ffn_size=FFN),
               torch.nn.Linear(HIDDEN, EXPERTS, bias=False), routing="topk", top_k=TOP_K, output_kind="logits")
    layers["flat"] = parallelize(flat, ParallelContext.create(EP, EXPERTS))
    torch.manual_seed(0)
    gate = HierarchicalGate(torch.nn.Linear(HIDDEN, GROUPS, bias=False),
                            torch.nn.Linear(HIDDEN, EXPERTS, bias=False), GROUPS)
    hier = MoE(FFNExpertBank.create(EXPERTS, hidden_size=HIDDEN, ffn_size=FFN), gate, routing="hierarchical",
               num_groups=GROUPS, top_groups=TOP_GROUPS, top_k=TOP_K, output_kind="logits")
    layers["hierarchical"] = parallelize(hier, ParallelContext.create(EP, EXPERTS))
    return layers


def step(layer, x: torch.Tensor, cotangent: torch.Tensor):
    """One forward and backward; returns the forward's routing statistics."""
    out = layer(x)
    (out.output * cotangent).sum().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return out.routing_stats


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(args.tokens, HIDDEN, generator=g).requires_grad_(True)  # inside a network: dx goes back
    cot = torch.randn(args.tokens, HIDDEN, generator=g)
    layers = build_layers()
    times = {name: [] for name in layers}
    for i in range(args.warmup + args.steps):  # sides interleaved, under the same load
        for name, layer in layers.items():
            dist.barrier()
            start = time.perf_counter()
            step(layer, x, cot)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= args.warmup:
                times[name].append(float(elapsed))
    per_rank = {}
    for name, layer in layers.items():
        with ByteCounter() as counter:
            stats = step(layer, x, cot)
        # mean over the ranks of: rows sent, the minimum, measured bytes
        values = torch.tensor([stats["remote_rows_sent"], stats["min_remote_rows"], counter.bytes], dtype=torch.float64)
        dist.all_reduce(values)
        per_rank[name] = (values / world).tolist()
    if rank == 0:
        result = {"tokens_per_rank": args.tokens, "hidden": HIDDEN, "ffn": FFN, "experts": EXPERTS,
                  "groups": GROUPS, "top_groups": TOP_GROUPS, "top_k": TOP_K, "ep_size": EP, "threads_per_rank": 1,
                  "step_seconds": {n: statistics.median(t) for n, t in times.items()},
                  "remote_rows_sent_per_rank": {n: v[0] for n, v in per_rank.items()},
                  "min_remote_rows_per_rank": {n: v[1] for n, v in per_rank.items()},
                  "bytes_sent_per_step_per_rank": {n: v[2] for n, v in per_rank.items()}}
        Path(out_path).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def report(r: dict) -> str:
    row_mb = r["hidden"] * 4 / 2**20
    lines = [f"E = {r['experts']} FFN experts (hidden {r['hidden']}, FFN {r['ffn']}), {r['tokens_per_rank']} tokens "
             f"per rank, ep_size {r['ep_size']}, 2 gloo processes x 1 thread; flat top-{r['top_k']} vs "
             f"hierarchical {r['groups']} groups, top-{r['top_groups']} group x top-{r['top_k']} experts",
             f"{'routing':<13} {'step s':>8} {'rows sent':>10} {'min rows':>9} {'MB sent':>8} {'min MB':>7}"]
    for n, t in r["step_seconds"].items():
        rows, least = r["remote_rows_sent_per_rank"][n], r["min_remote_rows_per_rank"][n]
        lines.append(f"{n:<13} {t:>8.3f} {rows:>10.0f} {least:>9.0f} "
                     f"{r['bytes_sent_per_step_per_rank'][n] / 2**20:>8.2f} {least * row_mb * 2 * 2:>7.2f}")
    lines.append("rows: per rank and forward pass (the outputs come back as many); MB: per rank and step, "
                 "forward and backward, measured / the routing's minimum (there and back, twice)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 tokens, 1 step")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.steps, args.warmup = 256, 1, 0
    result = run_two_ranks(worker, args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
