"""Stacked runs against separate runs: Fashion-MNIST vanilla MoE members (configs/fmnist/vanilla.yaml,
E = 5, batch 512), R = 1, 3, 10, 30, 100.

For each R, a fresh process builds R members (seeds 0..R-1) with the real trainer code and
times training steps: once as one stack (``moe_dist.train.stacked``: one forward and backward
for all members, each member's Adam step) and once as separate runs in the same process
(``Trainer.train_step`` of each run in turn). Separate runs cost the same each, so beyond 3
the separate time is the mean of 3 runs' step times times R (said in the output). Prints
member-steps per second, run-epochs per second (an epoch: the training set / 512 steps), the
ratio stack / separate (> 1: the stack is faster), and each process's peak memory (resident
set on the CPU, allocated memory on CUDA).

Data: the full Fashion-MNIST when ``--data-root`` (default ``$MOE_DIST_DATA``) holds
``fashion-mnist/``, else the repository's MNIST fixture (mnist10k: the same image shape, so the
same networks and step cost). ``--device cuda`` on a GPU machine (gates vmapped there).

Run: ``python benchmarks/bench_stack.py --threads 2`` (several minutes on 2 CPU cores);
``--quick`` for R = 1, 3 and 3 steps; ``--json FILE`` saves the numbers. Quote the machine's
load (``uptime``) with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "fmnist" / "vanilla.yaml"
FIXTURE = REPO / "tests" / "data"


def data_overrides(root: str) -> list[str]:
    if root and (Path(root) / "fashion-mnist").is_dir():
        return ["data.name=fashion_mnist", f"data.root={root}"]
    return ["data.name=mnist10k", f"data.root={FIXTURE}"]


def configs(members: int, args: argparse.Namespace, folder: str):
    from moe_dist.config import load_config

    common = [*data_overrides(args.data_root), "train.progress=false", f"train.num_threads={args.threads}",
              f"train.device={args.device}"]
    return [load_config(CONFIG, [*common, f"seed={s}", f"run_dir={folder}/r{s}"]) for s in range(members)]


def time_stack(members: int, args: argparse.Namespace) -> dict:
    """Seconds per stacked step of ``members`` members (after one warm-up step)."""
    from moe_dist.train.stacked import build_stacked_trainer

    with tempfile.TemporaryDirectory() as folder:
        trainer = build_stacked_trainer(configs(members, args, folder))
        running = list(range(members))
        feeds = [m.data.train_batches.batches(0) for m in trainer.members]
        tallies = {i: _tally(m) for i, m in enumerate(trainer.members)}
        augment = [lambda x, i: x] * members
        seconds = []
        for step, batches in zip(range(args.steps + 1), zip(*feeds)):
            start = time.perf_counter()
            trainer.train_step(batches, step, augment, running, tallies, {})
            _sync(args.device)
            seconds.append(time.perf_counter() - start)
        steps_per_epoch = len(trainer.members[0].data.train_batches)
    return {"step_seconds": sorted(seconds[1:])[len(seconds[1:]) // 2], "steps_per_epoch": steps_per_epoch}


def time_separate(members: int, args: argparse.Namespace) -> dict:
    """Seconds per step of each of min(members, 3) separate runs, in turn, in this process."""
    from moe_dist.train.build import build_trainer

    measured = []
    with tempfile.TemporaryDirectory() as folder:
        for cfg in configs(min(members, 3), args, folder):
            trainer = build_trainer(cfg)
            seconds = []
            for step, (x, y, _) in zip(range(args.steps + 1), trainer.data.train_batches.batches(0)):
                start = time.perf_counter()
                trainer.train_step(x, y)
                _sync(args.device)
                seconds.append(time.perf_counter() - start)
            measured.append(sorted(seconds[1:])[len(seconds[1:]) // 2])
            trainer.close()
    per_run = sum(measured) / len(measured)
    return {"step_seconds": per_run * members, "per_run_step_seconds": per_run, "runs_timed": len(measured)}


def _tally(member):
    from moe_dist.train.tally import EpochTally

    return EpochTally(member.data.num_clusters, member.num_experts, member.device)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints its JSON line."""
    from moe_dist.train.hardware import peak_memory_mb

    import torch

    result = (time_stack if args.mode == "stack" else time_separate)(args.members, args)
    result["peak_memory_mb"] = peak_memory_mb(torch.device(args.device))
    print(json.dumps(result))


def measure(mode: str, members: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--members", str(members), "--steps", str(args.steps),
           "--threads", str(args.threads), "--device", args.device, "--data-root", args.data_root]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--data-root", default=os.environ.get("MOE_DIST_DATA", ""))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="")
    parser.add_argument("--child", default="", choices=("", "stack", "separate"), dest="mode")
    args = parser.parse_args()
    if args.mode:
        args.members = args.members[0]
        return child(args)
    sizes = args.members or ([1, 3] if args.quick else [1, 3, 10, 30, 100])
    args.steps = 3 if args.quick else args.steps
    rows = []
    print(f"{'R':>4} {'stack s/step':>13} {'separate s/step':>16} {'stack/sep speed':>16} "
          f"{'run-epochs/s stack':>19} {'peak MB stack':>14} {'peak MB sep':>12}")
    for R in sizes:
        stack, separate = measure("stack", R, args), measure("separate", R, args)
        if "error" in stack or "error" in separate:
            print(f"{R:>4} failed: {stack.get('error') or separate.get('error')}")
            rows.append({"members": R, "stack": stack, "separate": separate})
            continue
        speed = separate["step_seconds"] / stack["step_seconds"]
        epochs = R / (stack["step_seconds"] * stack["steps_per_epoch"])
        print(f"{R:>4} {stack['step_seconds']:>13.3f} {separate['step_seconds']:>16.3f} {speed:>15.2f}x "
              f"{epochs:>19.3f} {stack['peak_memory_mb']:>14.0f} {separate['peak_memory_mb']:>12.0f}")
        rows.append({"members": R, "stack": stack, "separate": separate, "speedup": speed})
    print(f"(separate: {min(max(sizes), 3)} runs timed, the rest extrapolated; "
          f"{args.steps} steps after one warm-up, median; {args.threads} threads, {args.device})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
