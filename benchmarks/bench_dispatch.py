"""Benchmark the expert-parallel top-k dispatch against DeepSpeed's MoE layer.

Two gloo processes (one thread each), expert parallelism over both (ep_size 2), a
token-level layer: E = 8 FFN experts (hidden 256, FFN 1024), top-2, 4096 tokens per rank.

* ``ours``: ``moe_dist.models.MoE`` (routing topk) with ``ExpertParallelDispatch``:
  index-based, each token's row sent once per destination rank with its K gate weights,
  the weighted outputs summed there and one row sent back per (token, rank), dropless.
* ``deepspeed``: ``deepspeed.moe.layer.MoE`` with the same weights and routing, dropless
  (``drop_tokens=False``: its capacity becomes the largest expert count), and
  ``deepspeed-cf1``: its default capacity factor 1.0 (tokens over capacity dropped).
* ``dense-grouped`` / ``dense-bmm``: the same expert FLOPs (each rank's experts on as many
  rows as the routing gives them, split evenly) with no routing, no gate and no
  communication, each process on its own: with the kernel our dispatch runs
  (``forward_grouped``) and with one ``baddbmm``. The *dispatch overhead ratio* of a layer
  is its step time over the faster of the two. They run interleaved with the layers, under
  the same load.

Reported: forward+backward step time (median over steps, the slower rank's time per step),
tokens/s over both ranks and ours over DeepSpeed's, the overhead ratio; bytes each rank
sends to the other per step (all-to-all payloads, measured by wrapping
``torch.distributed.all_to_all_single``): ``send`` (forward, before the experts run: the
tokens and any counts, routing metadata and gate weights) and ``return`` (forward, after:
the outputs) against the minimum of one direction (each token's row once to each *other*
rank holding one of its experts), and the total of send, return and their gradients against
4x that minimum. Our return is that minimum (the experts' rank combines a token's outputs);
a return of one row per remote (token, expert) pair, as DeepSpeed's, is printed as a ratio
too. Then the step time of
``ours`` (and DeepSpeed) as the number of experts grows at fixed k (E = 4 ... 64, all sizes
interleaved step by step), with t(E=64)/t(E=4).

Both processes keep freed memory for reuse, as the trainer's CPU processes do
(``moe_dist.train.process.keep_freed_memory``).

Run: ``python benchmarks/bench_dispatch.py`` (about four minutes on 2 busy CPU cores);
``--quick`` for a smoke run; ``--json FILE`` to save the numbers. Needs DeepSpeed for its
rows (``pip install -e ".[deepspeed]"``); without it only ours and dense are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    import moe_dist  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, FFN, K, EP = 256, 1024, 2, 2


def build_layers(num_experts: int, with_deepspeed: bool):
    """Our layer and (optionally) DeepSpeed's, with the same gate and expert weights."""
    from moe_dist.models import MoE
    from moe_dist.models.ffn import FFNExpert, FFNExpertBank
    from moe_dist.parallel import ParallelContext, parallelize

    torch.manual_seed(0)
    ours = MoE(FFNExpertBank.create(num_experts, hidden_size=HIDDEN, ffn_size=FFN),
               torch.nn.Linear(HIDDEN, num_experts, bias=False), routing="topk", top_k=K, output_kind="logits")
    ctx = ParallelContext.create(EP, num_experts)
    parallelize(ours, ctx)
    layers = {"ours": ours}
    if with_deepspeed:
        import deepspeed

        for name, drop, cf in (("deepspeed", False, 1.0), ("deepspeed-cf1", True, 1.0)):
            layer = deepspeed.moe.layer.MoE(hidden_size=HIDDEN, expert=FFNExpert(HIDDEN, FFN),
                                            num_experts=num_experts, ep_size=EP, k=K, drop_tokens=drop,
                                            capacity_factor=cf, eval_capacity_factor=cf, use_rts=False,
                                            min_capacity=0, top2_2nd_expert_sampling=False)
            layer.set_deepspeed_parallelism()
            with torch.no_grad():
                layer.deepspeed_moe.gate.wg.weight.copy_(ours.gate.weight)
                for mine, expert in zip(ours.experts.to_modules(), layer.deepspeed_moe.experts.deepspeed_experts):
                    expert.load_state_dict(mine.state_dict())
            layers[name] = layer
    return layers, ctx


class DenseExperts(torch.nn.Module):
    """This rank's experts on ``rows`` rows in total, no routing, split evenly over them.

    ``grouped=True``: the kernel our dispatch runs (``FFNExpertBank.forward_grouped`` on
    rows sorted by expert); ``False``: one ``baddbmm`` on ``[L, rows / L, HIDDEN]``. The
    overhead ratios are taken against the faster of the two.
    """

    def __init__(self, num_local: int, rows: int, grouped: bool):
        super().__init__()
        from moe_dist.models.ffn import FFNExpertBank

        torch.manual_seed(0)
        self.bank = FFNExpertBank.create(num_local, hidden_size=HIDDEN, ffn_size=FFN)
        self.rows = rows
        self.grouped = grouped

    def forward(self, x):
        L = self.bank.num_experts
        n = self.rows // L
        x_RD = x.repeat(math.ceil(self.rows / x.shape[0]), 1)[: L * n]
        if self.grouped:
            return self.bank.forward_grouped(x_RD, torch.full((L,), n), need_hidden=False)[0]
        return self.bank(x_RD.view(L, n, -1), shared=False)[0]


class CommFloor(torch.nn.Module):
    """The exchanges alone: the minimum rows each way (tokens out, outputs back, and the two
    gradients: four all-to-alls of ``rows`` rows to the other rank), no computation. Its
    step time is what any dispatch must pay on this machine's gloo transport; with the
    dense step it gives the *overhead floor* (dense + exchanges) / dense. Threads are as
    busy as the layers': the loopback copies run on the same cores as the experts."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor([rows]))  # what each rank sends to the others
        me = dist.get_rank()
        self.send = [0 if j == me else rows for j in range(len(counts))]
        self.recv = [0 if j == me else int(c) for j, c in enumerate(counts)]
        self.width = width

    def forward(self, x):
        buf = x.new_empty(sum(self.send), self.width)
        out = x.new_empty(sum(self.recv), self.width)
        for _ in range(4):
            dist.all_to_all_single(out, buf, self.recv, self.send)
        return out


def layer_step(name: str, layer, x: torch.Tensor, cotangent: torch.Tensor):
    if name == "comm-floor":
        return layer(x)
    xi = x.requires_grad_(True) if not x.requires_grad else x
    out = layer(xi)
    if name.startswith("dense"):
        (out * cotangent.repeat(math.ceil(out.numel() / cotangent.numel()), 1).view(-1)[: out.numel()]
         .view_as(out)).sum().backward()
        layer.zero_grad(set_to_none=True)
        return out
    y = out.output if name == "ours" else out[0]
    (y * cotangent).sum().backward()
    layer.zero_grad(set_to_none=True)
    xi.grad = None
    return out


class ByteCounter:
    """Wraps dist.all_to_all_single: bytes this rank sends to *other* ranks, in total
    (``bytes``) and per ``phase`` (set by the caller: ``by_phase[phase]``)."""

    def __init__(self):
        self.bytes = 0
        self.phase = "all"
        self.by_phase: dict[str, int] = {}
        self._orig = dist.all_to_all_single

    def __enter__(self):
        def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            n = dist.get_world_size(group)
            me = dist.get_rank(group)
            rows = input.shape[0] if input.dim() else 1
            splits = input_split_sizes or [rows // n] * n
            row_bytes = input.numel() * input.element_size() // max(rows, 1)
            sent = (sum(splits) - splits[me]) * row_bytes
            self.bytes += sent
            # token rows (or their outputs) against what travels with them: counts, routing
            # metadata, gate weights
            kind = "rows" if input.dim() >= 2 and input.shape[-1] == HIDDEN and input.is_floating_point() else "meta"
            for key in (self.phase, f"{self.phase}:{kind}"):
                self.by_phase[key] = self.by_phase.get(key, 0) + sent
            return self._orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig


def counted_step(name: str, layer, x: torch.Tensor, cotangent: torch.Tensor) -> dict[str, int]:
    """One forward+backward step; bytes sent before the experts run (``send``: the tokens,
    counts and routing metadata), after them in the forward (``return``: the outputs) and in
    the backward (``backward``)."""
    experts = layer.experts if name == "ours" else layer.deepspeed_moe.experts
    with ByteCounter() as counter:
        def to_return(*_):
            counter.phase = "return"

        hook = experts.register_forward_pre_hook(to_return)  # DeepSpeed's experts; our padded path
        grouped = experts.forward_grouped if name == "ours" else None
        if grouped is not None:  # our FFN experts run through forward_grouped, not forward
            experts.forward_grouped = lambda *a, **kw: (to_return(), grouped(*a, **kw))[1]
        counter.phase = "send"
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        counter.phase = "backward"
        ((out.output if name == "ours" else out[0]) * cotangent).sum().backward()
        hook.remove()
        if grouped is not None:
            del experts.forward_grouped
        layer.zero_grad(set_to_none=True)
    return {"send": 0, "return": 0, "backward": 0, "send:rows": 0, "send:meta": 0, **counter.by_phase}


def timed_steps(layers: dict, x, cotangent, steps: int, warmup: int) -> dict[str, list[float]]:
    """Step times of each layer (all layers interleaved step by step, so that they share the
    machine's load); each step's time is the slower rank's."""
    times = {name: [] for name in layers}
    for step in range(warmup + steps):
        for name, layer in layers.items():
            dist.barrier()
            start = time.perf_counter()
            layer_step(name.split("@")[0], layer, x.clone(), cotangent)  # "ours@64": ours, E = 64
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step >= warmup:
                times[name].append(float(elapsed))
    return times


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from moe_dist.train.process import keep_freed_memory

    # glibc keeps freed memory, as in the trainer's CPU processes: without it every large
    # buffer (the experts' weight gradients at E = 64: 32 MB each) is a fresh mmap per step
    malloc_kept = keep_freed_memory()
    with_ds = args.deepspeed
    if with_ds:
        from moe_dist.parallel.deepspeed_engine import import_deepspeed

        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(out_path).parent / "torch_extensions"))
        import_deepspeed().init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict = {"tokens_per_rank": args.tokens, "hidden": HIDDEN, "ffn": FFN, "k": K, "ep_size": EP,
                    "threads_per_rank": 1, "malloc_kept": malloc_kept}
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(args.tokens, HIDDEN, generator=g)
    cot = torch.randn(args.tokens, HIDDEN, generator=g)

    # ---- main comparison, E = 8
    layers, ctx = build_layers(8, with_ds)
    with torch.no_grad():  # routing balance and the minimum bytes of this routing
        routed = layers["ours"](x)
    stats = routed.routing_stats
    owner_E = torch.tensor([r for r, block in enumerate(ctx.expert_blocks(8)) for _ in block])
    remote_pairs = int((owner_E[routed.expert_index] != ctx.ep_rank).sum())
    dense = {f"dense-{kind}": DenseExperts(8 // EP, stats["expert_rows"], kind == "grouped")
             for kind in ("grouped", "bmm")}
    floor = {"comm-floor": CommFloor(stats["min_remote_rows"], HIDDEN)}
    steps = timed_steps({**layers, **dense, **floor}, x, cot, args.steps, args.warmup)
    t = {n: statistics.median(v) for n, v in steps.items()}
    best = {n: min(v) for n, v in steps.items()}  # the least disturbed step, on a loaded machine
    t_dense = {n: t.pop(n) for n in dense}
    t_comm = t.pop("comm-floor")
    best.pop("comm-floor")
    fastest = min(t_dense.values())
    if rank == 0:
        result["step_seconds"] = t
        result["best_step_seconds"] = best
        result["tokens_per_second"] = {n: EP * args.tokens / v for n, v in t.items()}
        result["dense_step_seconds"] = t_dense
        result["comm_floor_seconds"] = t_comm
        result["overhead_floor"] = (fastest + t_comm) / fastest
        result["overhead_ratio"] = {n: v / fastest for n, v in t.items()}
        if "deepspeed" in t:
            result["tokens_per_second_ours_over_deepspeed"] = t["deepspeed"] / t["ours"]
            result["best_ours_over_deepspeed"] = best["deepspeed"] / best["ours"]
        result["best_overhead_ratio"] = {n: best[n] / min(best[d] for d in dense) for n in t}

    # ---- bytes per step, this rank to the other: send (tokens), return (outputs), backward
    phases = ("send", "return", "backward", "send:rows", "send:meta")
    sent = {name: counted_step(name, layer, x, cot) for name, layer in layers.items()}
    row_bytes = HIDDEN * 4
    # each token once to each other rank holding one of its experts (send); the same back
    # (return), the K outputs being combined there; per pair: one row per remote pair back
    minimum = stats["min_remote_rows"] * row_bytes
    pairs = remote_pairs * row_bytes
    totals = torch.tensor([float(sent[n][ph]) for n in layers for ph in phases] + [float(minimum), float(pairs)])
    dist.all_reduce(totals)
    totals = (totals / world).tolist()
    if rank == 0:
        n_ph = len(phases)
        per = {n: dict(zip(phases, totals[n_ph * i:n_ph * (i + 1)])) for i, n in enumerate(layers)}
        minimum, pairs = totals[-2:]
        result["bytes_per_step"] = per
        result["bytes_minimum_per_direction"] = minimum
        result["bytes_remote_pairs"] = pairs
        result["bytes_ratio_to_minimum"] = {
            n: {"send": v["send"] / minimum, "send_rows": v["send:rows"] / minimum,
                "send_meta": v["send:meta"] / minimum, "return": v["return"] / minimum,
                "total": sum(v[ph] for ph in phases[:3]) / (4 * minimum)} for n, v in per.items()}
        result["routed_rows_per_rank_ours"] = stats["routed"]
        result["padding_ratio_ours"] = 1 - stats["expert_rows"] / stats["padded_rows"]
    del layers

    # ---- step time vs number of experts, fixed k (all sizes interleaved, like the sides)
    # dense-grouped: the expert kernel alone on the same (balanced) rows, to tell the
    # kernel's own cost of smaller groups and larger weights from the dispatch's
    swept = {}
    for E in args.experts:
        layers, _ = build_layers(E, with_ds)
        layers.pop("deepspeed-cf1", None)
        layers["dense-grouped"] = DenseExperts(E // EP, K * args.tokens, True)
        swept.update({f"{n}@{E}": layer for n, layer in layers.items()})
    times = timed_steps(swept, x, cot, args.steps, 1)
    sweep = {E: {n.split("@")[0]: statistics.median(v) for n, v in times.items() if n.endswith(f"@{E}")}
             for E in args.experts}
    low = {E: {n.split("@")[0]: min(v) for n, v in times.items() if n.endswith(f"@{E}")} for E in args.experts}
    if rank == 0:
        result["experts_sweep_step_seconds"] = {str(E): v for E, v in sweep.items()}
        first, last = args.experts[0], args.experts[-1]
        result["t_last_over_t_first"] = {n: sweep[last][n] / sweep[first][n] for n in sweep[first]}
        result["best_t_last_over_t_first"] = {n: low[last][n] / low[first][n] for n in low[first]}
        Path(out_path).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def report(r: dict, experts: list[int]) -> str:
    lines = [f"E = 8, k = {r['k']}, hidden {r['hidden']}, FFN {r['ffn']}, {r['tokens_per_rank']} tokens per rank, "
             f"ep_size {r['ep_size']}, 2 gloo processes x 1 thread",
             f"{'layer':<15} {'step s':>8} {'tokens/s':>10} {'overhead':>9} {'send/min':>9} {'rows/min':>9} "
             f"{'meta/min':>9} {'return/min':>11} {'total/min':>10}"]
    for n, t in r["step_seconds"].items():
        b = r["bytes_ratio_to_minimum"][n]
        lines.append(f"{n:<15} {t:>8.3f} {r['tokens_per_second'][n]:>10.0f} {r['overhead_ratio'][n]:>9.3f} "
                     f"{b['send']:>9.3f} {b['send_rows']:>9.3f} {b['send_meta']:>9.3f} {b['return']:>11.3f} "
                     f"{b['total']:>10.3f}")
    lines.append("send = rows (the token rows) + meta (counts, routing metadata, gate weights), each against "
                 "the minimum rows")
    for n, t in r["dense_step_seconds"].items():
        lines.append(f"{n:<15} {t:>8.3f}  (the same expert FLOPs per process, no dispatch)")
    lines.append(f"exchanges alone (4 all-to-alls of the minimum rows): {r['comm_floor_seconds']:.4f} s per step; "
                 f"overhead floor of any dispatch here (dense + exchanges) / dense: {r['overhead_floor']:.3f}")
    if "tokens_per_second_ours_over_deepspeed" in r:
        lines.append(f"tokens/s ours / deepspeed (dropless): {r['tokens_per_second_ours_over_deepspeed']:.3f} "
                     f"(fastest steps: {r['best_ours_over_deepspeed']:.3f})")
    lines.append("overhead from the fastest steps: "
                 + ", ".join(f"{n} {v:.3f}" for n, v in r["best_overhead_ratio"].items()))
    lines.append(f"minimum bytes per direction per step per rank: {r['bytes_minimum_per_direction'] / 2**20:.2f} MB "
                 f"(send: each token once per other rank holding one of its experts; total/min counts send, "
                 f"return and their gradients against 4x it); a return of one row per remote (token, expert) pair "
                 f"would be "
                 f"{r['bytes_remote_pairs'] / r['bytes_minimum_per_direction']:.3f}x; "
                 f"our padding ratio {r['padding_ratio_ours']:.3f}")
    lines.append("step seconds vs number of experts (k fixed):")
    sweep = r["experts_sweep_step_seconds"]
    names = list(next(iter(sweep.values())))
    lines.append(f"{'E':>4} " + " ".join(f"{n:>10}" for n in names))
    for E in experts:
        lines.append(f"{E:>4} " + " ".join(f"{sweep[str(E)][n]:>10.3f}" for n in names))
    lines.append(f"t(E={experts[-1]})/t(E={experts[0]}): "
                 + ", ".join(f"{n} {v:.3f}" for n, v in r["t_last_over_t_first"].items())
                 + "; fastest steps: "
                 + ", ".join(f"{n} {v:.3f}" for n, v in r["best_t_last_over_t_first"].items()))
    return "\n".join(lines)


def run_two_ranks(worker, args: argparse.Namespace, nprocs: int = 2) -> dict:
    """Run ``worker(rank, nprocs, port, args, out_path)`` in ``nprocs`` (default 2) spawned
    processes; rank 0 writes its result as JSON to ``out_path``, returned here."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(worker, args=(nprocs, port, args, str(out)), nprocs=nprocs, start_method="spawn")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 tokens, 2 steps")
    parser.add_argument("--no-deepspeed", dest="deepspeed", action="store_false")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.steps, args.warmup, args.experts = 512, 2, 1, [4, 16]
    if args.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            print("DeepSpeed not installed: measuring ours and dense only")
            args.deepspeed = False
    result = run_two_ranks(worker, args)
    print(report(result, args.experts))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
