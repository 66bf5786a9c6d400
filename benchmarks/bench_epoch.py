"""Benchmark whole training epochs of a config in this checkout against another checkout.

Each side runs ``python -m moe_dist.cli train --config CONFIG train.epochs=1`` in its own
checkout (its own package and, if it has one, its own ``.venv``), as a fresh process, into
a temporary run folder; the figures come from the run's ``metrics.json``: ``step_seconds``
(training time / steps) and the first epoch's ``epoch_seconds`` (its steps plus the
evaluation of the test set). Runs of the two sides alternate, so drifts in machine speed
hit both; the table reports medians and the ratio this checkout / baseline (below 1: faster).

Use it to check that a change to the training loop costs nothing, e.g. against the last
commit::

    git worktree add /tmp/base HEAD~1
    python benchmarks/bench_epoch.py --baseline /tmp/base --repeats 3

Default config: the full-scale Fashion-MNIST vanilla MoE (60,000 training images: put the
files where ``moe-dist data info fashion_mnist`` finds them, or pass ``--data-root``).
``--quick``: two tiny synthetic epochs, a smoke run. Report the machine's load with the
figures (``uptime``): on a shared 2-core machine a loaded step can take 3x an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_of(checkout: Path) -> str:
    venv = checkout / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def one_epoch(checkout: Path, config: str, overrides: list[str]) -> dict[str, float]:
    """Train one epoch in ``checkout``; its step and epoch seconds."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [python_of(checkout), "-m", "moe_dist.cli", "train", "--config", config, "train.epochs=1",
               "train.progress=false", f"run_dir={run_dir}", *overrides]
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{checkout}: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {"step_seconds": metrics["step_seconds"], "epoch_seconds": metrics["history"][0]["epoch_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the other checkout (a git worktree of a base commit)")
    parser.add_argument("--config", default="configs/fmnist/vanilla.yaml")
    parser.add_argument("--data-root", default="", help="data.root for both sides")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny synthetic epochs (a smoke run)")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for both sides")
    args = parser.parse_args()
    config, overrides = args.config, list(args.overrides)
    if args.quick:
        config = "configs/synthetic/s1_moe_nonlinear.yaml"
        overrides += ["data.train_size=1000", "data.test_size=500"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    sides = {"this checkout": REPO, "baseline": Path(args.baseline).resolve()}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, checkout in sides.items():
            results[name].append(one_epoch(checkout, config, overrides))
    print(f"{config} {' '.join(overrides)}: one epoch, median of {args.repeats}, load {os.getloadavg()[0]:.2f}")
    print(f"{'side':<15} {'step ms':>9} {'epoch s':>9}")
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    for name, m in medians.items():
        print(f"{name:<15} {1000 * m['step_seconds']:>9.2f} {m['epoch_seconds']:>9.2f}")
    ours, base = medians["this checkout"], medians["baseline"]
    print(f"{'ratio':<15} {ours['step_seconds'] / base['step_seconds']:>9.3f} "
          f"{ours['epoch_seconds'] / base['epoch_seconds']:>9.3f}")


if __name__ == "__main__":
    main()
