"""Fashion-MNIST vanilla MoE (E = 5, the gate with BatchNorm) on 1 and on 2 processes.

Trains ``configs/fmnist/vanilla.yaml`` twice from the same seed, each as a fresh process tree
into a temporary run folder: once in one process, once under ``torchrun --nproc_per_node 2``
with ``parallel.ep_size=2`` (uneven expert blocks, experts 0-2 | 3-4; the gate replicated, its
BatchNorm on the global batch's statistics). Prints each run's step time (``step_seconds``
of ``metrics.json``: training time / steps), the ratio t(2)/t(1), and the two histories side by
side (training loss and test error per epoch), which should agree to float rounding: N
processes follow the one-process run.

Data: the full Fashion-MNIST when ``--data-root`` holds ``fashion-mnist/`` (``moe-dist data
info fashion_mnist --root DIR``), else the repository's MNIST fixture (``tests/data``, dataset
``mnist10k``: the same image shape, so the same networks). ``--train-size`` takes a subset
(0: all). Every process runs ``--threads`` threads (default 1, so that 2 processes use 2 cores
and 1 process 1 core; pass 2 to give the single process the same cores).

Run: ``python benchmarks/bench_ep_fmnist.py`` (a few minutes on 2 idle cores);
``--quick`` for a smoke run; ``--json FILE`` to save the numbers. Report the machine's load
with the figures (``uptime``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fmnist" / "vanilla.yaml"
FIXTURE = REPO / "tests" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_overrides(root: str) -> list[str]:
    """Full Fashion-MNIST under ``root``, else the mnist10k fixture."""
    if root and (Path(root) / "fashion-mnist").is_dir():
        return ["data.name=fashion_mnist", f"data.root={root}"]
    if root:
        print(f"{root} holds no fashion-mnist/: using the mnist10k fixture", file=sys.stderr)
    return ["data.name=mnist10k", f"data.root={FIXTURE}"]


def train(nproc: int, overrides: list[str]) -> dict:
    """One training run on ``nproc`` processes; its metrics.json."""
    with tempfile.TemporaryDirectory() as run_dir:
        cli = ["-m", "moe_dist.cli", "train", "--config", str(CONFIG), f"run_dir={run_dir}", *overrides]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(free_port()), *cli, f"parallel.ep_size={nproc}"]
        else:
            cmd = [sys.executable, *cli]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return json.loads((Path(run_dir) / "metrics.json").read_text())


def report(one: dict, two: dict) -> dict:
    """Print step times and the two histories side by side; return the numbers."""
    t1, t2 = one["step_seconds"], two["step_seconds"]
    print(f"{'processes':<10} {'step ms':>9}")
    print(f"{'1':<10} {1000 * t1:>9.2f}\n{'2 (ep 2)':<10} {1000 * t2:>9.2f}\nt(2)/t(1) = {t2 / t1:.3f}")
    print(f"\n{'epoch':>5} {'loss (1)':>11} {'loss (2)':>11} {'rel diff':>9} {'err (1)':>8} {'err (2)':>8}")
    rows = []
    for a, b in zip(one["history"], two["history"]):
        rel = abs(b["train_loss"] - a["train_loss"]) / abs(a["train_loss"])
        err1, err2 = a.get("test_error", float("nan")), b.get("test_error", float("nan"))
        print(f"{a['epoch']:>5} {a['train_loss']:>11.6f} {b['train_loss']:>11.6f} {rel:>9.1e} "
              f"{err1:>8.4f} {err2:>8.4f}")
        rows.append({"epoch": a["epoch"], "train_loss": [a["train_loss"], b["train_loss"]],
                     "test_error": [err1, err2]})
    return {"step_seconds": [t1, t2], "ratio": t2 / t1, "history": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="", help="a data root holding fashion-mnist/ (default: the fixture)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=8000, help="training subset (0: the whole split)")
    parser.add_argument("--test-size", type=int, default=2000, help="test subset (0: the whole split)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (train.num_threads)")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 1,024 images (a smoke run)")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_size, args.test_size = 2, 1024, 500
    overrides = [*data_overrides(args.data_root), f"train.epochs={args.epochs}", "train.eval_every=1",
                 "train.progress=false", f"train.num_threads={args.threads}"]
    overrides += [f"data.train_size={args.train_size}"] if args.train_size else []
    overrides += [f"data.test_size={args.test_size}"] if args.test_size else []
    one = train(1, overrides)
    two = train(2, overrides)
    print(f"{CONFIG.relative_to(REPO)} {' '.join(overrides)}; load {os.getloadavg()[0]:.2f}\n")
    numbers = report(one, two)
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": overrides, **numbers}, indent=2))


if __name__ == "__main__":
    main()
