"""``moe-dist study``: the papers' multi-run studies.

* ``study experts`` (docs/papers.md A.10, figures 6-7): how many experts a regulariser uses as E
  grows. The paper's claim: L_cv (importance) spreads samples over all E experts, L_s routes
  to only as many experts as the task needs. Each (E, regulariser, seed) is a separate
  ``moe-dist train`` process, so its ``peak_memory_mb`` is its own; ``--nproc N`` starts
  each under torchrun on N processes (with ``parallel.ep_size=`` among the overrides: the
  experts sharded). Every run trains for the config's ``train.epochs`` (the paper's E = 15
  L_cv model had only 10 epochs, A.10).
* ``study pretrained-gate`` (docs/papers.md A.6, Table 1): see moe_dist/experiments/pretrained.py.

Both also run under a launcher, ``torchrun --nproc_per_node N -m moe_dist.cli study ...
parallel.ep_size=N``: every rank then trains each run in-process, one process group held for
the whole study (moe_dist.parallel.process_group), and only rank 0 writes the tables and the
figure, which equal a single process's. Run in-process, ``peak_memory_mb`` is the highest
of the process so far (it only grows along the study); use ``--nproc`` to measure it per run.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_dist.config import load_config
from moe_dist.errors import ConfigError, MoEDistError
from moe_dist.experiments import dead_experts
from moe_dist.experiments.arguments import IntermixedParser, comma_ints, reject_overrides
from moe_dist.fields import names
from moe_dist.launch import moe_dist_command
from moe_dist.rundir import RunDir
from moe_dist.tables import markdown_table

def _regularizer(routing: str, importance: float = 0.0, beta: float = 0.0, gamma: float = 0.0) -> tuple[str, ...]:
    """The overrides of one regulariser: every loss weight and the routing, set explicitly so
    that the base config's own regulariser cannot leak into a study point. L_s with the
    reference normalisation, the paper's code (docs/papers.md A.2.2); without L_s the variant
    is left alone (it changes nothing, and earlier runs keep matching their configs)."""
    variant = ("loss.ls_variant=reference",) if beta or gamma else ()
    return (f"moe.routing={routing}", f"loss.importance_weight={importance}", f"loss.ls_beta={beta}",
            f"loss.ls_gamma={gamma}", *variant)


#: The study's regularisers per architecture (``model.arch``). MNIST: the paper's plotted models
#: of figures 6-7 (A.10: their model files name L_cv w = 1.0 and L_s beta = 1e-5, gamma = 1e-4;
#: the training cells' 1e-6 / 1e-1 were not plotted). Fashion-MNIST: the paper's chosen values
#: of Table 7 (configs/fmnist/*.yaml), the study at scale. ``vanilla`` has no regulariser;
#: ``attentive_ls`` is the attentive gate with its own chosen L_s.
REGULARIZERS: dict[str, dict[str, tuple[str, ...]]] = {
    "mnist": {"vanilla": _regularizer("dense"), "lcv": _regularizer("dense", importance=1.0),
              "ls": _regularizer("dense", beta=1.0e-5, gamma=1.0e-4),
              "attentive_ls": _regularizer("attentive", beta=1.0e-6, gamma=1.0e-2)},
    "fmnist": {"vanilla": _regularizer("dense"), "lcv": _regularizer("dense", importance=0.2),
               "ls": _regularizer("dense", beta=1.0e-7, gamma=1.0e-2),
               "attentive_ls": _regularizer("attentive", beta=1.0e-6, gamma=1.0e-6)},
}
#: What ``--regularizers`` defaults to: the paper's figure for MNIST, the issue's four at scale.
DEFAULT_REGULARIZERS = {"mnist": ("lcv", "ls"), "fmnist": ("vanilla", "lcv", "ls", "attentive_ls")}


def regularizers_of(config: str | Path) -> dict[str, tuple[str, ...]]:
    """The regulariser table of ``config``'s architecture; ConfigError for one without."""
    arch = load_config(config).model.arch
    if arch not in REGULARIZERS:
        raise ConfigError(f"model.arch={arch!r}: study experts has regulariser settings for "
                          f"{', '.join(REGULARIZERS)} only")
    return REGULARIZERS[arch]


#: Keys each study run sets; overriding them would be ignored.
OWNED_KEYS = ("name", "run_dir", "seed", "moe.num_experts", "moe.routing", "loss.importance_weight",
              "loss.ls_beta", "loss.ls_gamma", "loss.ls_variant")
#: study.csv columns: (E, regulariser) identify the row; the rest are means over seeds of these
#: metrics.json fields, in study.md's column order (checked against moe_dist/fields.py).
METRIC_COLUMNS = names("experts_used", "usage_entropy", "test_error", "step_seconds", "peak_memory_mb")


def experts_run_dir(root: Path, regularizer: str, num_experts: int, seed: int) -> Path:
    """The run folder of one (regulariser, E, seed) of the study."""
    return root / f"{regularizer}_e{num_experts}" / f"seed{seed}"


def train_process(config: str | Path, overrides: Sequence[str], nproc: int = 1) -> None:
    """One ``moe-dist train`` in its own process(es): its peak memory is then its own."""
    cmd = [*moe_dist_command(nproc), "train", "--config", str(config), *overrides]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise MoEDistError(f"study run failed (exit {result.returncode}): {' '.join(cmd)}")


def run_experts_study(config: str | Path, experts: Sequence[int], regularizers: Sequence[str] | None = None,
                      seeds: Sequence[int] = (0,), root: str | Path = "runs/study_experts",
                      overrides: Sequence[str] = (), nproc: int = 1, stack: bool = False) -> list[dict[str, Any]]:
    """Train every (E, regulariser, seed) not yet complete, then write study.md, study.csv
    and study.png under ``root``. Returns the table rows (means over seeds).

    Each run is its own process, or ``nproc`` under torchrun; started by a launcher itself
    (several ranks), the study trains every run in-process on the launcher's ranks. With
    ``stack``, one ``moe-dist stack`` process trains the runs, the regularisers and seeds of
    each E as one stack (their step time and peak memory are then the stack's)."""
    from moe_dist.parallel import is_main, process_group, world_info_from_env
    from moe_dist.train.build import build_trainer
    from moe_dist.train.process import process_group_backend

    table = regularizers_of(config)
    if regularizers is None:
        regularizers = DEFAULT_REGULARIZERS[load_config(config).model.arch]
    unknown = [r for r in regularizers if r not in table] or ([] if regularizers else [""])
    if unknown:
        raise ConfigError(f"--regularizers {unknown[0]!r} is not one of: {', '.join(table)}")
    reject_overrides(overrides, OWNED_KEYS, "use --experts, --regularizers, --seeds and --root")
    launched = world_info_from_env().distributed
    if nproc < 1 or (launched and nproc != 1):
        raise ConfigError(f"--nproc {nproc}: must be a positive integer, and is left out under a launcher "
                          "(the study then trains on the launcher's ranks)")
    root = Path(root)
    runs_args = _study_runs(config, experts, {r: table[r] for r in regularizers}, seeds, root, overrides)
    if stack:
        _train_stacked(config, root, runs_args, nproc, launched)
    first = next(iter(runs_args.values()))[0]  # the runs share one group: the first run's settings
    with process_group(process_group_backend(first), first.parallel.timeout_s):
        for cfg, args in runs_args.values():
            if RunDir(cfg.run_dir).finished(cfg):
                continue
            if launched:
                build_trainer(cfg).fit()
            else:
                train_process(config, args, nproc)
    runs = {(r, E): [RunDir(experts_run_dir(root, r, E, s)).read_metrics() for s in seeds]
            for r in regularizers for E in experts}
    rows = []
    for (regularizer, E), metrics in runs.items():
        row: dict[str, Any] = {"E": E, "regularizer": regularizer, "seeds": len(metrics)}
        for key in METRIC_COLUMNS:
            values = [m[key] for m in metrics if m.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        rows.append(row)
    if not is_main():
        return rows
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "study.md").write_text(experts_markdown(rows, config))
    experts_figure({key: metrics[0]["selection_table"] for key, metrics in runs.items()}, rows,
                   root / "study.png")
    return rows


def _study_runs(config, experts, regularizers: dict[str, tuple[str, ...]], seeds, root: Path, overrides) -> dict:
    """(regulariser, E, seed) -> (config, overrides) of every run; every config is checked
    before anything trains. E-major, so that the cheaper expert counts finish (and can be
    committed) first when a long study is interrupted."""
    runs_args = {}
    for E in experts:
        for regularizer in regularizers:
            for seed in seeds:
                run_dir = experts_run_dir(root, regularizer, E, seed)
                args = [*overrides, *regularizers[regularizer], f"moe.num_experts={E}", f"seed={seed}",
                        f"name=study_experts/{regularizer}_e{E}", f"run_dir={run_dir}"]
                runs_args[(regularizer, E, seed)] = (load_config(config, args), args)
    return runs_args


def _train_stacked(config: str | Path, root: Path, runs_args: dict, nproc: int, launched: bool) -> None:
    """The unfinished runs as a stack file ``root/stack.yaml``, trained by one ``moe-dist stack``."""
    from moe_dist.experiments.stacks import StackEntry, write_stack_file

    if nproc != 1 or launched:
        raise ConfigError("--stack trains the runs in one process: leave out --nproc and the launcher")
    todo = [StackEntry(str(config), tuple(args)) for cfg, args in runs_args.values() if not RunDir(cfg.run_dir).finished(cfg)]
    if not todo:
        return
    write_stack_file(root / "stack.yaml", todo)
    cmd = [*moe_dist_command(1), "stack", str(root / "stack.yaml")]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise MoEDistError(f"study stack failed (exit {result.returncode}): {' '.join(cmd)}")


def experts_markdown(rows: list[dict[str, Any]], config: str | Path) -> str:
    """study.md: one row per (E, regulariser), what the paper's figures 6-7 show in numbers."""
    fmt = lambda v, p=3: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [
        "# Expert-count study (docs/papers.md A.10)",
        "",
        f"Base config `{config}`; lcv = L_cv w 1.0, ls = L_s beta 1e-5 gamma 1e-4 (reference normalisation), "
        "the paper's plotted models. experts used = experts receiving > 1 % of the test samples (top-gated); "
        "H_u in bits (max log2 E); means over seeds.",
        "",
        markdown_table(("E", "regulariser", "seeds", "experts used", "H_u", "test error", "step s", "peak memory MB"),
                       [(r["E"], r["regularizer"], r["seeds"], fmt(r["experts_used"], 1), fmt(r["usage_entropy"]),
                         fmt(r["test_error"], 4), fmt(r["step_seconds"], 4), fmt(r["peak_memory_mb"], 0))
                        for r in rows]),
    ]
    return "\n".join(lines) + "\n"


def experts_figure(tables: dict[tuple[str, int], list[list[int]]], rows: list[dict[str, Any]], path: Path) -> None:
    """Like the paper's figure 6: expert-selection heatmaps (experts x true class, first
    seed) with one row per regulariser and one column per E, and experts used vs E."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    regularizers = list(dict.fromkeys(r for r, _ in tables))
    counts = sorted({E for _, E in tables})
    fig = plt.figure(figsize=(2.8 * len(counts) + 3.6, 2.6 * len(regularizers) + 0.6))
    grid = fig.add_gridspec(len(regularizers), len(counts) + 1, width_ratios=[1.0] * len(counts) + [1.2])
    for i, regularizer in enumerate(regularizers):
        for j, E in enumerate(counts):
            ax = fig.add_subplot(grid[i, j])
            table_EC = np.asarray(tables[(regularizer, E)], dtype=float)
            ax.imshow(table_EC, cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_title(f"{regularizer}, E = {E}", fontsize=9)
            ax.set_xticks(range(table_EC.shape[1]))
            ax.set_xticklabels([str(c) for c in range(table_EC.shape[1])], fontsize=6)
            ax.set_yticks(range(E))
            ax.set_yticklabels([str(e) for e in range(E)], fontsize=5 if E > 10 else 6)
            if i == len(regularizers) - 1:
                ax.set_xlabel("true class", fontsize=8)
            if j == 0:
                ax.set_ylabel("top-gated expert", fontsize=8)
    ax = fig.add_subplot(grid[:, -1])
    for regularizer in regularizers:
        points = sorted((r["E"], r["experts_used"]) for r in rows if r["regularizer"] == regularizer)
        ax.plot(*zip(*points), marker="o", label=regularizer)
    ax.plot(counts, counts, linestyle="--", color="grey", linewidth=0.8, label="all experts")
    ax.set_xlabel("experts E")
    ax.set_ylabel("experts used (> 1 % of samples)")
    ax.set_xticks(counts)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- CLI

def cmd_experts(args: argparse.Namespace) -> int:
    from moe_dist.parallel import is_main

    rows = run_experts_study(args.config, args.experts, args.regularizers, args.seeds, args.root, args.overrides,
                             args.nproc, args.stack)
    if not is_main():
        return 0
    print((Path(args.root) / "study.md").read_text())
    print(f"{len(rows)} rows: {args.root}/study.md, study.csv, study.png")
    return 0


def cmd_pretrained_gate(args: argparse.Namespace) -> int:
    from moe_dist.experiments.pretrained import SPLITS, run_pretrained_gate_study
    from moe_dist.parallel import is_main

    if args.dataset not in SPLITS:
        raise ConfigError(f"--dataset {args.dataset!r} is not one of: {', '.join(SPLITS)}")
    available = SPLITS[args.dataset]
    for k in args.splits:
        if not 0 <= k < len(available):
            raise ConfigError(f"--splits {k}: {args.dataset} has splits 0..{len(available) - 1}")
    run_pretrained_gate_study(args.dataset, {k: available[k] for k in args.splits}, args.seeds, args.root,
                              args.overrides)
    if not is_main():
        return 0
    print((Path(args.root) / args.dataset / "summary.md").read_text())
    return 0


def register(subparsers: Any) -> None:
    """Add ``moe-dist study experts ...`` and ``moe-dist study pretrained-gate ...``."""
    raw = argparse.RawDescriptionHelpFormatter
    study = subparsers.add_parser(
        "study", help="multi-run studies of the papers (expert count, pretrained gate)", formatter_class=raw,
        description="The papers' multi-run studies: experts used as the number of experts grows (experts), and\n"
                    "whether end-to-end training finds a good decomposition (pretrained-gate). Each writes\n"
                    "its runs and a summary under --root. Details: README, \"Studies\".",
        epilog="examples:\n  moe-dist study experts --config configs/mnist/vanilla.yaml --experts 5,10,15\n"
               "  moe-dist study pretrained-gate --dataset mnist10k --splits 0,1 --seeds 0")
    sub = study.add_subparsers(dest="study", required=True, parser_class=IntermixedParser)
    dead_experts.register(sub)

    p = sub.add_parser("experts", help="experts used vs number of experts, per regulariser (paper A.10)",
                       description="Train the config at each expert count with each regulariser (L_cv, L_s) and\n"
                                   "seed, one moe-dist train process per run, then tabulate and plot experts used,\n"
                                   "H_u, error, step time and peak memory (study.md, study.csv, study.png).\n"
                                   "Details: README, \"Studies\".",
                       epilog="example:\n  moe-dist study experts --config configs/mnist/vanilla.yaml "
                              "--experts 5,10,15 --seeds 0,1 data.name=mnist10k", formatter_class=raw)
    p.add_argument("--config", required=True, help="base MoE config, e.g. configs/mnist/vanilla.yaml")
    p.add_argument("--experts", type=comma_ints, default=[5, 10, 15], help="expert counts (default 5,10,15)")
    p.add_argument("--regularizers", type=lambda s: [r for r in s.split(",") if r], default=None,
                   help=f"any of {','.join(REGULARIZERS['fmnist'])} (default: lcv,ls for MNIST, all four for "
                        "Fashion-MNIST)")
    p.add_argument("--seeds", type=comma_ints, default=[0], help="seeds (default 0)")
    p.add_argument("--root", default="runs/study_experts", help="folder of the runs and the report")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="start each run under torchrun on N processes (default 1: one process); "
                        "add parallel.ep_size=N to shard the experts")
    p.add_argument("--stack", action="store_true",
                   help="train the runs of each E (regularisers x seeds) as one stack, in one process")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run")
    p.set_defaults(func=cmd_experts)

    p = sub.add_parser("pretrained-gate", help="pretrained gate / pretrained experts (paper Section 4.2, A.6)",
                       description="Paper section 4.2: gates and experts trained end-to-end (scratch) against an\n"
                                   "intuitive decomposition (one expert pretrained per class pair), each gate then\n"
                                   "reused with new experts; a summary next to the paper's Table 1. Details: README,\n"
                                   "\"Studies\".",
                       epilog="example:\n  moe-dist study pretrained-gate --dataset mnist10k --splits 0,1,2,3,4 "
                              "--seeds 0",
                       formatter_class=raw)
    p.add_argument("--dataset", default="mnist10k", help="mnist10k | fmnist_mnist (default mnist10k)")
    p.add_argument("--splits", type=comma_ints, default=[0], help="indices of the paper's class-pair splits")
    p.add_argument("--seeds", type=comma_ints, default=[0], help="seeds (default 0)")
    p.add_argument("--root", default="runs/section4", help="folder of the runs and the summary")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every stage")
    p.set_defaults(func=cmd_pretrained_gate)
