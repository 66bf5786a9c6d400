"""Scale-out cost of the Fashion-MNIST vanilla MoE: step time, memory and bytes per step.

The architecture of ``configs/fmnist/vanilla.yaml`` (CNN gate with BatchNorm, MLP experts,
dense routing: every expert sees every sample) with E experts, trained on random 28 x 28
inputs and labels: one training step is forward, loss (``moe_dist.losses.model_loss``),
backward, the gradient sums (``GradientReducer``) and an Adam update, as the trainer does.

* ``ep_size 1``: one process holds every expert (no communication);
* ``ep_size 2``: two gloo processes, each with its block of experts (uneven when E is odd),
  the global batch split between them (expert parallelism, ``moe_dist.parallel``).

One thread per process. ``batch`` is the global batch (each of two processes holds half).
Each (E, batch, ep_size) runs in fresh spawned processes, one after the other, so that each
process's peak resident set is its own: ``peak_rss_mb`` is ``getrusage`` max RSS of each
process at the end (Python, torch and the data included), ``rss_delta_mb`` that minus the
resident set before the model was built (the model, Adam, gradients and activations). Step
time: median over ``--steps`` steps after ``--warmup``, each step the slowest rank's. Bytes:
what each rank sends to the other per step, counted by ``moe_dist.parallel.traffic`` (the
gradient and BatchNorm all-reduces as a ring, ``2 (P - 1) / P`` x size: a model), by kind.

Run: ``python benchmarks/bench_scaleout.py`` (about two minutes on 2 busy CPU cores);
``--quick`` for a smoke run (about a minute: six process groups); ``--json FILE`` to save the
numbers, which ``benchmarks/scaleout_model.py FILE`` fits a cost model to
(``docs/results/scaleout/README.md``). Report the machine's load with the figures (printed:
``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
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

from bench_dispatch import run_two_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fmnist" / "vanilla.yaml"
EXPERTS = (5, 10, 20, 40, 80, 160)
BATCH = 512
BATCH_SWEEP_E, BATCH_SWEEP = 20, (256, 512, 1024)  # global batches measured at E = 20
KINDS = ("dispatch", "gradients", "other")


def rss_mb() -> float:
    """The resident set now (Linux /proc/self/statm), MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(num_experts: int, world: int):
    """The Fashion-MNIST vanilla MoE with E experts (this rank's block under ep_size 2), its
    gradient reducer and Adam."""
    from moe_dist.config import load_config
    from moe_dist.models import build_model
    from moe_dist.parallel import GradientReducer, ParallelContext, parallelize

    cfg = load_config(CONFIG, [f"moe.num_experts={num_experts}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, cfg.loss, 10, (1, 28, 28))
    reduce = None
    if world > 1:
        ctx = ParallelContext.create(ep_size=world, num_experts=num_experts)
        parallelize(model, ctx)
        reduce = GradientReducer(model, ctx)
    return model, reduce, torch.optim.Adam(model.parameters(), lr=cfg.train.lr)


def train_step(model, reduce, optimizer, x: torch.Tensor, y: torch.Tensor, global_batch: int) -> None:
    from moe_dist.losses import model_loss

    loss, _ = model_loss(model(x), y, "auto", global_batch if reduce is not None else None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if reduce is not None:
        reduce()
    optimizer.step()


def measure(rank: int, world: int, args: argparse.Namespace) -> dict:
    """This rank's numbers for one (E, batch, world): median slowest-rank step, bytes per step
    by kind, memory."""
    import moe_dist.models  # noqa: F401  (imported before the baseline: not counted as the model's)
    import moe_dist.losses  # noqa: F401
    from moe_dist.parallel import traffic

    g = torch.Generator().manual_seed(1000 + rank)
    local = args.batch // world + (rank < args.batch % world)
    x, y = torch.randn(local, 1, 28, 28, generator=g), torch.randint(0, 10, (local,), generator=g)
    base = rss_mb()
    model, reduce, optimizer = build(args.experts, world)
    params = sum(p.numel() for p in model.parameters())
    times, sent = [], []
    for step in range(args.warmup + args.steps):
        if world > 1:
            dist.barrier()
        before = traffic.SENT.snapshot()
        start = time.perf_counter()
        train_step(model, reduce, optimizer, x, y, args.batch)
        elapsed = torch.tensor([time.perf_counter() - start])
        if step >= args.warmup:
            sent.append(traffic.SENT.since(before))
        if world > 1:  # the step ends for everyone when the slowest rank is done
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= args.warmup:
            times.append(float(elapsed))
    del model, reduce, optimizer
    gc.collect()
    from moe_dist.models import native

    return {"step_seconds": statistics.median(times), "step_seconds_all": times, "params": params,
            "native": native.library() is not None,  # the gate's block (and its global BatchNorm) ran natively
            "bytes": {k: statistics.mean(s[k] for s in sent) for k in KINDS},
            "peak_rss_mb": peak_rss_mb(), "rss_delta_mb": peak_rss_mb() - base}


def link_bandwidth(world: int, nbytes: int = 8 * 2**20, repeats: int = 5) -> float:
    """Bytes per second one rank sends to the other in an all-to-all of ``nbytes`` (median of
    ``repeats``): the gloo loopback link the steps above used, under the same load."""
    x = torch.zeros(nbytes // 4)
    out = torch.empty_like(x)
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(out, x)
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds.append(float(elapsed))
    return nbytes * (world - 1) / world / statistics.median(seconds)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mine = measure(rank, world, args)
    bandwidth = link_bandwidth(world) if world > 1 else None
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        row = {"experts": args.experts, "ep_size": world, "processes": world, "batch": args.batch,
               "step_seconds": ranks[0]["step_seconds"],  # the same on every rank: the slowest's
               "step_seconds_all": ranks[0]["step_seconds_all"],
               "params_per_process": [r["params"] for r in ranks],
               "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
               "rss_delta_mb": [r["rss_delta_mb"] for r in ranks],
               "bytes_per_step": [r["bytes"] for r in ranks], "link_bytes_per_second": bandwidth,
               "native": all(r["native"] for r in ranks)}
        Path(out_path).write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def points(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(E, global batch) to measure: every E at ``--batch``, then ``--batches`` at E = 20."""
    pts = [(E, args.batch_default) for E in args.experts_list]
    return pts + [(BATCH_SWEEP_E, b) for b in args.batches if (BATCH_SWEEP_E, b) not in pts]


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for E, batch in points(args):
        for world in (1, 2):
            job = argparse.Namespace(**vars(args), experts=E, batch=batch)
            row = run_two_ranks(worker, job, nprocs=world)
            row["load"] = os.getloadavg()[0]
            rows.append(row)
            print(f"E={E} batch={batch} ep_size={world}: {1000 * row['step_seconds']:.1f} ms, "
                  f"load {row['load']:.2f}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One Markdown line per (E, batch, ep_size): step ms, t(ep 2)/t(ep 1), memory, MB sent per rank."""
    from moe_dist.tables import markdown_table

    one = {(r["experts"], r["batch"]): r["step_seconds"] for r in rows if r["ep_size"] == 1}
    headers = ("E", "batch", "ep", "step ms", "t / t(ep 1)", "peak RSS MB", "model + act MB", "dispatch MB",
               "gradients MB", "other KB", "total MB", "load")
    lines = []
    for r in rows:
        sent = {k: max(b[k] for b in r["bytes_per_step"]) for k in KINDS}  # the busiest rank
        lines.append((r["experts"], r["batch"], r["ep_size"], f"{1000 * r['step_seconds']:.1f}",
                      f"{r['step_seconds'] / one[(r['experts'], r['batch'])]:.2f}", f"{max(r['peak_rss_mb']):.0f}",
                      f"{max(r['rss_delta_mb']):.0f}", f"{sent['dispatch'] / 2**20:.3f}",
                      f"{sent['gradients'] / 2**20:.3f}", f"{sent['other'] / 2**10:.2f}",
                      f"{sum(sent.values()) / 2**20:.3f}", f"{r['load']:.2f}"))
    return (markdown_table(headers, lines, align=["right"] * len(headers))
            + "\nstep ms: median of the slowest rank's steps; memory and bytes: the larger of the ranks; bytes a "
              "rank sends to the other per step (all-reduces as a ring: a model); load: 1-min average")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", dest="experts_list", type=int, nargs="+", default=list(EXPERTS))
    parser.add_argument("--batch", dest="batch_default", type=int, default=BATCH, help="global batch of the E sweep")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCH_SWEEP),
                        help=f"global batches at E = {BATCH_SWEEP_E}")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: E = 5 and 20 at batch 64, batch 32 at E = 20, 2 steps")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    parser.add_argument("--table", default="", help="print the table of an earlier --json FILE (measures nothing)")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["rows"]))
        return
    if args.quick:
        args.experts_list, args.batch_default, args.batches, args.steps, args.warmup = [5, 20], 64, [32], 2, 1
    load_before = os.getloadavg()
    rows = run(args)
    print(f"{CONFIG.relative_to(REPO)} architecture, random inputs, 1 thread per process, gloo; "
          f"load (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, "
          f"after {tuple(round(v, 2) for v in os.getloadavg())}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": str(CONFIG.relative_to(REPO)), "threads_per_process": 1, "steps": args.steps,
            "warmup": args.warmup, "load_before": load_before, "load_after": os.getloadavg(), "rows": rows},
            indent=1))


if __name__ == "__main__":
    main()
