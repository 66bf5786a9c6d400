"""Weak scaling on CPU processes: 1 and 2 gloo processes, experts scaled with the processes.

The token-level top-k MoE layer of ``bench_dispatch.py`` (FFN experts, hidden 256, FFN 1024,
top-2, dropless), E = 4 experts and ``--tokens`` tokens per process, one thread per
process: 1 process holds E = 4 experts (no communication), 2 processes hold E = 8 with
ep_size 2 (4 each, samples routed with the variable-split all-to-all). Each process does
the same expert work, so ideal weak scaling keeps the step time: t(2)/t(1) = 1.

A step is a training step of the layer inside a network (its input needs a gradient):
forward, backward, the gate gradients summed over the processes
(``GradientReducer``; the experts are not replicated, so they need no reduction) and an Adam
update. Both sizes run in one job, interleaved step by step so that they see the same
background load: the 1-process step on rank 0 while rank 1 waits at a barrier, then the
2-process step (its time is the slower rank's). Medians over the steps.

Bytes: all-to-all payload each process sends to the other per step (forward and backward,
counted by ``bench_dispatch.ByteCounter``) against the routing minimum (each routed token's
hidden vector once to each other rank holding one of its experts, and the result back,
forward and backward); the gate-gradient all-reduce is listed separately.

Run: ``python benchmarks/bench_weak_scaling.py`` (about a minute on 2 busy CPU cores);
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

from bench_dispatch import FFN, HIDDEN, K, ByteCounter, run_two_ranks  # noqa: E402

EXPERTS_PER_PROCESS = 4


def build(num_experts: int, ctx):
    """The top-k FFN MoE with all E experts built from one seed, cut to this rank's, its
    gradient reducer and optimizer."""
    from moe_dist.models import MoE
    from moe_dist.models.ffn import FFNExpertBank
    from moe_dist.parallel import GradientReducer, parallelize

    torch.manual_seed(0)
    layer = MoE(FFNExpertBank.create(num_experts, hidden_size=HIDDEN, ffn_size=FFN),
                torch.nn.Linear(HIDDEN, num_experts, bias=False), routing="topk", top_k=K, output_kind="logits")
    parallelize(layer, ctx)
    reduce = GradientReducer(layer, ctx) if ctx.distributed else None
    return layer, reduce, torch.optim.Adam(layer.parameters(), lr=1e-4)


def train_step(layer, reduce, optimizer, x: torch.Tensor, cotangent: torch.Tensor) -> dict:
    x.grad = None
    out = layer(x)
    optimizer.zero_grad(set_to_none=True)
    (out.output * cotangent).sum().backward()
    if reduce is not None:
        reduce()
    optimizer.step()
    return out.routing_stats


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from moe_dist.parallel import ParallelContext

    g = torch.Generator().manual_seed(100 + rank)
    # a layer inside a network: its input needs a gradient (sent back in the backward pass)
    x = torch.randn(args.tokens, HIDDEN, generator=g).requires_grad_(True)
    cot = torch.randn(args.tokens, HIDDEN, generator=g)
    one = build(EXPERTS_PER_PROCESS, ParallelContext.local()) if rank == 0 else None
    ctx = ParallelContext.create(ep_size=world, num_experts=EXPERTS_PER_PROCESS * world)
    two = build(EXPERTS_PER_PROCESS * world, ctx)

    times: dict[int, list[float]] = {1: [], world: []}
    for step in range(args.warmup + args.steps):
        dist.barrier()
        if rank == 0:  # one process alone; the other waits at the next barrier
            start = time.perf_counter()
            train_step(*one, x, cot)
            elapsed_one = time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        train_step(*two, x, cot)
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= args.warmup:
            times[world].append(float(elapsed))
            if rank == 0:
                times[1].append(elapsed_one)

    with ByteCounter() as counter:
        stats = train_step(*two, x, cot)
    minimum = stats["min_remote_rows"] * HIDDEN * 4 * 2 * 2  # there and back, forward and backward
    totals = torch.tensor([float(counter.bytes), float(minimum), float(stats["expert_rows"])])
    dist.all_reduce(totals)
    gate_bytes = sum(p.numel() * p.element_size() for n, p in two[0].named_parameters() if n.startswith("gate"))
    if rank == 0:
        t1, t2 = statistics.median(times[1]), statistics.median(times[world])
        result = {
            "tokens_per_process": args.tokens, "hidden": HIDDEN, "ffn": FFN, "k": K,
            "experts_per_process": EXPERTS_PER_PROCESS, "threads_per_process": 1, "steps": args.steps,
            "step_seconds": {"1": t1, str(world): t2},
            "tokens_per_second": {"1": args.tokens / t1, str(world): world * args.tokens / t2},
            "ratio": t2 / t1,
            "bytes_sent_per_step": totals[0].item() / world,
            "bytes_minimum_per_step": totals[1].item() / world,
            "bytes_ratio_to_minimum": totals[0].item() / max(totals[1].item(), 1.0),
            "expert_rows_per_process": totals[2].item() / world,
            "gate_gradient_bytes": gate_bytes,
        }
        Path(out_path).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def report(r: dict) -> str:
    lines = [f"weak scaling: top-{r['k']} FFN MoE (hidden {r['hidden']}, FFN {r['ffn']}), "
             f"{r['experts_per_process']} experts and {r['tokens_per_process']} tokens per process, "
             f"1 thread per process, gloo, median of {r['steps']} steps",
             f"{'processes':>9} {'experts':>7} {'ep_size':>7} {'step s':>8} {'tokens/s':>9} "
             f"{'MB sent':>8} {'min MB':>7} {'/ min':>6}"]
    for n in sorted(r["step_seconds"], key=int):
        p = int(n)
        sent = r["bytes_sent_per_step"] if p > 1 else 0.0
        low = r["bytes_minimum_per_step"] if p > 1 else 0.0
        ratio = f"{r['bytes_ratio_to_minimum']:>6.2f}" if p > 1 else f"{'-':>6}"
        lines.append(f"{p:>9} {p * r['experts_per_process']:>7} {p:>7} {r['step_seconds'][n]:>8.3f} "
                     f"{r['tokens_per_second'][n]:>9.0f} {sent / 2**20:>8.2f} {low / 2**20:>7.2f} {ratio}")
    lines.append(f"t(2)/t(1) = {r['ratio']:.2f} (ideal 1.00; both measured interleaved in this run)")
    lines.append(f"MB sent: all-to-all payload per process per step (forward + backward); the gate-gradient "
                 f"all-reduce adds {r['gate_gradient_bytes'] / 2**10:.0f} KiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per process")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 tokens, 2 steps")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.steps, args.warmup = 512, 2, 1
    result = run_two_ranks(worker, args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
