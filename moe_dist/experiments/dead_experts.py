"""``moe-dist study dead-experts``: how often the Section 4.2 expert fails to train at all.

Section 4.2 (docs/papers.md A.6) trains many small experts: one per class pair to build the
"intuitive" decomposition, and fresh ones behind frozen gates. Some of our runs had an expert
that never learned (test error near chance on its own pair, 0.45-0.52, against <= 0.07 for the
others), which turns a run's mean into an outlier. This study repeats the pretraining step
alone - the published recipe: the MNIST-family expert (conv 1->1, a 5-unit ReLU layer), Adam
1e-3, batch 64, 20 epochs, the full 10-way softmax, on the samples of one class pair - over
many seeds, and counts the experts that fail. An expert *fails* when its test error on its pair
is above ``FAIL_ERROR`` (0.25: halfway between chance, 0.5, and a trained expert).

Runs ``root/pair{a}_{b}/seed{s}`` are ordinary run folders, trained as one stack per pair (one
process; finished runs are skipped, so the study resumes). ``summary.md`` / ``summary.csv``:
failures per pair and in all with a 95 % Wilson interval, and the chance that at least one of
a run's E experts fails, ``1 - (1 - p)^E``.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any

from moe_dist.config import Config, load_config
from moe_dist.errors import ConfigError
from moe_dist.experiments.arguments import reject_overrides
from moe_dist.experiments.pretrained import CONFIG_DIR, DATASETS, SPLITS, single_expert_config
from moe_dist.rundir import RunDir
from moe_dist.tables import markdown_table

#: Test error on its own class pair above which an expert counts as failed (chance is 0.5).
FAIL_ERROR = 0.25
OWNED_KEYS = ("name", "run_dir", "seed", "model.kind", "data.classes")


def pair_configs(dataset: str, split: int, seeds: list[int], root: Path, overrides=()) -> dict[tuple, list[Config]]:
    """(a, b) -> the configs of that pair's runs, one per seed: the pretraining stage's config
    (configs/section4/<prefix>_pretrained_gate.yaml) as a single expert on the pair."""
    base = load_config(CONFIG_DIR / f"{DATASETS[dataset]}_pretrained_gate.yaml", overrides)
    return {tuple(pair): [single_expert_config(base, pair, seed, f"section4/dead_experts/pair{pair[0]}_{pair[1]}",
                                               root / f"pair{pair[0]}_{pair[1]}" / f"seed{seed}")
                          for seed in seeds] for pair in SPLITS[dataset][split]}


def wilson(failed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a binomial proportion (sound at 0 or n failures)."""
    if n == 0:
        return 0.0, 1.0
    p = failed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(pairs: dict[tuple, list[Config]], experts: int) -> list[dict[str, Any]]:
    """One row per pair and one for all pairs: runs, failures, rate and its interval."""
    rows, total, total_failed = [], 0, 0
    for pair, cfgs in pairs.items():
        errors = {c.seed: RunDir(c.run_dir).read_metrics()["test_error"] for c in cfgs
                  if RunDir(c.run_dir).finished(c)}
        failed = [seed for seed, error in errors.items() if error > FAIL_ERROR]
        rows.append(_row(f"{pair[0]} vs {pair[1]}", len(errors), len(failed), failed))
        total, total_failed = total + len(errors), total_failed + len(failed)
    overall = _row("all pairs", total, total_failed, [])
    overall["p_any_of_E"] = 1 - (1 - overall["rate"]) ** experts if total else None
    return [*rows, overall]


def _row(label: str, n: int, failed: int, seeds: list[int]) -> dict[str, Any]:
    low, high = wilson(failed, n)
    return {"pair": label, "runs": n, "failed": failed, "rate": failed / n if n else 0.0,
            "ci_low": low, "ci_high": high, "failed_seeds": " ".join(map(str, seeds))}


def write_summary(rows: list[dict[str, Any]], root: Path, dataset: str, split: int, experts: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[-1] if k != "p_any_of_E"] + ["p_any_of_E"],
                                restval="")
        writer.writeheader()
        writer.writerows(rows)
    overall = rows[-1]
    table = markdown_table(("class pair", "runs", "failed", "rate", "95 % interval", "failed seeds"),
                           [(r["pair"], r["runs"], r["failed"], f"{r['rate']:.3f}",
                             f"{r['ci_low']:.3f}-{r['ci_high']:.3f}", r["failed_seeds"]) for r in rows])
    (root / "summary.md").write_text(
        f"# Section 4.2 expert pretraining, repeated over seeds: {dataset}, split {split}\n\n"
        f"An expert fails when its test error on its own class pair exceeds {FAIL_ERROR} (chance 0.5).\n\n"
        f"{table}\n\nChance that at least one of a run's {experts} experts fails, 1 - (1 - p)^{experts}: "
        f"{overall['p_any_of_E']:.3f}\n")


def run_dead_experts_study(dataset: str, split: int, seeds: list[int], root: str | Path,
                           overrides=()) -> list[dict[str, Any]]:
    """Train every unfinished (pair, seed) as one stack per pair, then summarise."""
    from moe_dist.train.stacked import build_stacked_trainer

    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r} is not one of: {', '.join(DATASETS)}")
    if not 0 <= split < len(SPLITS[dataset]):
        raise ConfigError(f"--split {split}: {dataset} has splits 0..{len(SPLITS[dataset]) - 1}")
    reject_overrides(overrides, OWNED_KEYS, "use --split, --seeds and --root")
    root = Path(root)
    pairs = pair_configs(dataset, split, seeds, root, overrides)
    for cfgs in pairs.values():
        todo = [c for c in cfgs if not RunDir(c.run_dir).finished(c)]
        if todo:
            build_stacked_trainer(todo).fit()
    rows = summarize(pairs, len(SPLITS[dataset][split]))
    write_summary(rows, root, dataset, split, len(SPLITS[dataset][split]))
    return rows


def cmd_dead_experts(args: argparse.Namespace) -> int:
    from moe_dist.experiments.stacks import parse_seeds

    run_dead_experts_study(args.dataset, args.split, parse_seeds(args.seeds), args.root, args.overrides)
    print((Path(args.root) / "summary.md").read_text())
    return 0


def register(sub: Any) -> None:
    """Add ``moe-dist study dead-experts ...`` to the ``study`` subparsers."""
    p = sub.add_parser("dead-experts", help="how often the Section 4.2 expert fails to train (over seeds)",
                       description="Pretrain one expert per class pair of a split (the Section 4.2 recipe) for\n"
                                   "every seed, one stack per pair, and count the experts whose test error on\n"
                                   f"their pair stays above {FAIL_ERROR} (summary.md, summary.csv).",
                       epilog="example:\n  moe-dist study dead-experts --dataset mnist10k --split 0 --seeds 0-99 "
                              "--root runs/dead_experts", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist10k", help="mnist10k | fmnist_mnist (default mnist10k)")
    p.add_argument("--split", type=int, default=0, help="index of the paper's class-pair split (default 0)")
    p.add_argument("--seeds", default="0-19", help="seeds, e.g. 0-99 or 0,3,7 (default 0-19)")
    p.add_argument("--root", default="runs/section4/dead_experts", help="folder of the runs and the summary")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run")
    p.set_defaults(func=cmd_dead_experts)
