"""Time one training step of the Fashion-MNIST vanilla MoE (configs/fmnist/vanilla.yaml).

E = 5 MNIST-family experts (hidden 64), the FashionMNIST gate (conv, BatchNorm, ReLU, pool),
dense output mixture, batch 512, Adam, float32, ``--threads`` torch threads (default 2). The
step is the trainer's own: ``build_trainer(cfg)`` then ``Trainer.train_step`` (forward, loss,
backward, optimizer step) on the run's first training batches, as ``moe-dist train`` runs it.

In the same run, a baseline is timed in alternating rounds with it (so that a drift in the
machine's speed hits both; the figures are per step, median and best round):

* ``reference``: the plain PyTorch ``nn.Module`` model of the paper, same weights: the gate as
  ``max_pool2d(relu(bn(conv(x))))`` and its linear layers, the five experts as five
  ``MnistExpert`` modules in a loop, softmax mixture, mixture NLL, ``torch.optim.Adam`` with
  its defaults (always in this process, so it shares its memory settings);
* ``--baseline CHECKOUT``: the same trainer step of another checkout (e.g. a git worktree of
  the commit before a change), each side in its own process, the two in lockstep.

``--profile`` prints the torch profiler's top operations (self CPU time) of each side.
Data: the full Fashion-MNIST when ``--data-root`` holds ``fashion-mnist/``, else the MNIST
fixture of the repository (``tests/data``, the same image shape, so the same networks).
Report the machine's load with the figures (the load is printed; a loaded 2-core machine
can take 3x an idle one's time, which is why the same-run ratio is the figure to quote).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fmnist" / "vanilla.yaml"
FIXTURE = REPO / "tests" / "data"


def build(data_root: str, threads: int, num_batches: int = 8):
    """The trainer of the config and its first training batches."""
    from moe_dist.config import load_config
    from moe_dist.train.build import build_trainer

    if data_root and (Path(data_root) / "fashion-mnist").is_dir():
        data = ["data.name=fashion_mnist", f"data.root={data_root}"]
    else:
        data = ["data.name=mnist10k", f"data.root={FIXTURE}"]
    cfg = load_config(CONFIG, [*data, f"run_dir={tempfile.mkdtemp()}", f"train.num_threads={threads}",
                               "train.progress=false", "train.batch_size=512"])
    trainer = build_trainer(cfg)
    batches = trainer.data.train_batches.batches(0)
    return trainer, [next(batches)[:2] for _ in range(num_batches)]


def trainer_step(trainer, batches) -> Callable[[int], None]:
    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        trainer.train_step(x, y)
    return step


def reference_step(trainer, batches) -> Callable[[int], None]:
    """The paper's plain nn.Module model with the trainer's weights (module docstring)."""
    from moe_dist.losses import mixture_nll

    gate = copy.deepcopy(trainer.model.gate).train()
    experts = torch.nn.ModuleList(trainer.model.experts.to_modules()).train()
    params = [*gate.parameters(), *experts.parameters()]
    optimizer = torch.optim.Adam(params, lr=trainer.cfg.train.lr)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        z = F.max_pool2d(F.relu(gate.bn(gate.conv(x))), 2).flatten(1)
        logits = gate.out(F.relu(gate.fc2(F.relu(gate.fc1(z)))))
        probs = F.softmax(logits, dim=-1)
        outs = torch.stack([e(x)[0] for e in experts])
        loss = mixture_nll(torch.einsum("be,ebc->bc", probs, outs), y)
        float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def time_rounds(steps: dict[str, Callable[[int], None]], rounds: int, per_round: int,
                warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each side, one entry per round; the sides alternate."""
    for step in steps.values():
        for i in range(warmup):
            step(i)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for i in range(per_round):
                step(i)
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def profile_table(step: Callable[[int], None], n: int = 10, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            step(i)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=45)


def summary(name: str, seconds: list[float]) -> dict[str, float]:
    return {"side": name, "median_ms": 1000 * statistics.median(seconds), "best_ms": 1000 * min(seconds)}


def serve(args) -> None:
    """``--serve``: this checkout's trainer step, timed on request. Reads ``step N`` lines
    (answers the seconds per step of N steps), ``profile`` (answers the table), ``quit``."""
    trainer, batches = build(args.data_root, args.threads)
    step = trainer_step(trainer, batches)
    time_rounds({"step": step}, 0, 0, args.warmup)
    done = 0
    for line in sys.stdin:
        command, *n = line.split()
        if command == "step":
            start = time.perf_counter()
            for i in range(int(n[0])):
                step(done + i)
            done += int(n[0])
            answer = (time.perf_counter() - start) / int(n[0])
        elif command == "profile":
            answer = profile_table(step)
        else:
            return
        print(json.dumps(answer), flush=True)


def compare_checkouts(args) -> list[dict[str, float]]:
    """This checkout's and the baseline's trainer step, each in its own process, in lockstep:
    ``--steps`` steps on one side, then on the other, ``--rounds`` times, so that both see the
    same machine (the idle side waits on its pipe)."""
    sides = {"this checkout": REPO, "baseline": Path(args.baseline).resolve()}
    procs = {}
    for name, checkout in sides.items():
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", f"--threads={args.threads}",
               f"--warmup={args.warmup}", f"--data-root={args.data_root}"]
        procs[name] = subprocess.Popen(cmd, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(name: str, command: str):
        procs[name].stdin.write(command + "\n")
        procs[name].stdin.flush()
        line = procs[name].stdout.readline()
        if not line:
            raise SystemExit(f"{sides[name]}: the benchmark process failed (see its stderr above)")
        return json.loads(line)

    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name in sides:
            times[name].append(ask(name, f"step {args.steps}"))
    for name in sides:
        if args.profile:
            print(f"\n-- profile, {name} (10 steps) --\n{ask(name, 'profile')}")
        procs[name].stdin.write("quit\n")
        procs[name].stdin.close()
        procs[name].wait()
    return [summary(name, t) for name, t in times.items()]


def print_rows(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}; load (1, 5, 15 min) {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'side':<16} {'median ms':>10} {'best ms':>9}")
    for r in rows:
        print(f"{r['side']:<16} {r['median_ms']:>10.2f} {r['best_ms']:>9.2f}")
    base = rows[-1]
    for r in rows[:-1]:
        print(f"ratio {r['side']} / {base['side']}: median {r['median_ms'] / base['median_ms']:.3f}, "
              f"best {r['best_ms'] / base['best_ms']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="", help="a data root holding fashion-mnist/ (default: the fixture)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--baseline", default="", help="another checkout whose trainer step to time as well")
    parser.add_argument("--profile", action="store_true", help="print the top operations of each side")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)
    trainer, batches = build(args.data_root, args.threads)
    steps = {"trainer step": trainer_step(trainer, batches), "reference": reference_step(trainer, batches)}
    print(f"{CONFIG.relative_to(REPO)}: batch 512, {args.threads} threads, {trainer.cfg.data.name}; "
          f"{args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up steps")
    times = time_rounds(steps, args.rounds, args.steps, args.warmup)
    rows = {"same process": [summary(name, t) for name, t in times.items()]}
    # the reference's process state (memory settings) is the trainer's: say which it was
    from moe_dist.train.process import keep_freed_memory
    print(f"glibc keeps freed memory in this process: {keep_freed_memory()}")
    print_rows("this checkout's trainer step and the plain nn.Module reference, same process", rows["same process"])
    if args.profile:
        for name, step in steps.items():
            print(f"\n-- profile, {name} (10 steps) --\n{profile_table(step)}")
    if args.baseline:
        rows["checkouts"] = compare_checkouts(args)
        print_rows(f"trainer step, this checkout and {args.baseline}, two processes in lockstep", rows["checkouts"])
    if args.json:
        Path(args.json).write_text(json.dumps({"load": os.getloadavg(), **rows}, indent=2))


if __name__ == "__main__":
    main()
