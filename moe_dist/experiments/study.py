"""``moe-dist study``: the papers' multi-run studies.

* ``study experts`` (docs/papers.md A.10, figures 6-7): how many experts a regulariser uses as E
  grows. The paper's claim: L_cv (importance) spreads samples over all E experts, L_s routes
  to only as many experts as the task needs. Each (E, regulariser, seed) is a separate
  ``moe-dist train`` process, so its ``peak_memory_mb`` is its own; ``--nproc N`` starts
  each under torchrun on N processes (with ``parallel.ep_size=`` among the overrides: the
  experts sharded). Every run trains for the config's ``train.epochs`` (the paper's E = 15
  L_cv model had only 10 epochs, A.10). The report (study.md, study.csv: mean ± std over
  seeds; the figures) is moe_dist/experiments/study_report.py and study_figures.py; it reads
  the run folders alone, so ``--report-only`` redoes it without training or data.
* ``study pretrained-gate`` (docs/papers.md A.6, Table 1): see moe_dist/experiments/pretrained.py.

Both also run under a launcher, ``torchrun --nproc_per_node N -m moe_dist.cli study ...
parallel.ep_size=N``: every rank then trains each run in-process, one process group held for
the whole study (moe_dist.parallel.process_group), and only rank 0 writes the tables and the
figures, which equal a single process's. Run in-process, ``peak_memory_mb`` is the highest
of the process so far (it only grows along the study); use ``--nproc`` to measure it per run.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_dist.config import load_config
from moe_dist.errors import ConfigError, MoEDistError
from moe_dist.experiments import dead_experts, loss_scale
from moe_dist.experiments.arguments import IntermixedParser, comma_ints, reject_overrides
from moe_dist.experiments.study_report import (StudyGrid, discover_grid, experts_run_dir, heatmap_choice,
                                               write_experts_report)
from moe_dist.launch import moe_dist_command
from moe_dist.rundir import RunDir

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
               "attentive_ls": _regularizer("attentive", beta=1.0e-6, gamma=1.0e-6),
               "ls_x1000": _regularizer("dense", beta=1.0e-4, gamma=10.0)},
}
# ls_x1000 (not a paper setting, not in the defaults): L_s at 1,000x the paper's beta and gamma.
# At the paper's weights L_s pulls on the gate with 1e-4 to 1e-3 of the task loss's gradient
# (``moe-dist study loss-scale``, docs/results/study_fmnist), so the study cannot tell L_s from
# no regulariser; at 1,000x its pull is of the order of L_cv's, which asks what L_s does when
# it acts.
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
#: Every regulariser name, in the study's order: the order of a report's rows and lines.
REGULARIZER_ORDER = tuple(dict.fromkeys(r for table in REGULARIZERS.values() for r in table))


def train_process(config: str | Path, overrides: Sequence[str], nproc: int = 1) -> None:
    """One ``moe-dist train`` in its own process(es): its peak memory is then its own."""
    cmd = [*moe_dist_command(nproc), "train", "--config", str(config), *overrides]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise MoEDistError(f"study run failed (exit {result.returncode}): {' '.join(cmd)}")


def run_experts_study(config: str | Path, experts: Sequence[int], regularizers: Sequence[str] | None = None,
                      seeds: Sequence[int] = (0,), root: str | Path = "runs/study_experts",
                      overrides: Sequence[str] = (), nproc: int = 1, stack: bool = False,
                      heatmaps: Sequence[int] | None = None,
                      heatmap_regularizers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Train every (E, regulariser, seed) not yet complete, then write study.md, study.csv
    and the figures under ``root`` (moe_dist/experiments/study_report.py). Returns study.csv's
    rows (mean and std over seeds).

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
    grid = StudyGrid(tuple(experts), tuple(regularizers), tuple(seeds))
    heatmap_choice(grid.experts, grid.regularizers, heatmaps, heatmap_regularizers)  # refused before training
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
    if not is_main():
        return []
    root.mkdir(parents=True, exist_ok=True)
    return write_experts_report(root, grid, config, heatmaps, heatmap_regularizers)


def experts_report(root: str | Path, experts: Sequence[int] | None = None, regularizers: Sequence[str] | None = None,
                   seeds: Sequence[int] | None = None, config: str | Path | None = None,
                   heatmaps: Sequence[int] | None = None,
                   heatmap_regularizers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``--report-only``: the report of the runs under ``root`` as they are, nothing trained and
    no data read. A list left out is what the run folders hold (their names: any regulariser,
    not only this version's table); a point with no finished run is listed as missing."""
    from moe_dist.parallel import is_main

    grid = discover_grid(Path(root), experts, regularizers, seeds, REGULARIZER_ORDER)
    if not is_main():
        return []
    return write_experts_report(root, grid, config, heatmaps, heatmap_regularizers)


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


# ---------------------------------------------------------------------------------- CLI

def cmd_experts(args: argparse.Namespace) -> int:
    from moe_dist.experiments.study_figures import FIGURE_NAMES
    from moe_dist.parallel import is_main

    if args.report_only:
        rows = experts_report(args.root, args.experts, args.regularizers, args.seeds, args.config, args.heatmaps,
                              args.heatmap_regularizers)
    elif args.config is None:
        raise ConfigError("--config is required to train the study (only --report-only goes without it)")
    else:
        rows = run_experts_study(args.config, args.experts or [5, 10, 15], args.regularizers, args.seeds or [0],
                                 args.root, args.overrides, args.nproc, args.stack, args.heatmaps,
                                 args.heatmap_regularizers)
    if not is_main():
        return 0
    print((Path(args.root) / "study.md").read_text())
    print(f"{len(rows)} rows: {args.root}/study.md, study.csv, {', '.join(FIGURE_NAMES)}")
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
    """Add ``moe-dist study experts ...``, ``pretrained-gate ...`` and ``dead-experts ...``."""
    raw = argparse.RawDescriptionHelpFormatter
    study = subparsers.add_parser(
        "study", help="multi-run studies of the papers (expert count, pretrained gate, dead experts)",
        formatter_class=raw,
        description="The papers' multi-run studies: experts used as the number of experts grows (experts),\n"
                    "whether end-to-end training finds a good decomposition (pretrained-gate), and how often\n"
                    "a Section 4.2 expert never trains (dead-experts). Each writes its runs and a summary\n"
                    "under --root. Details: README, \"Studies\".",
        epilog="examples:\n  moe-dist study experts --config configs/mnist/vanilla.yaml --experts 5,10,15\n"
               "  moe-dist study pretrained-gate --dataset mnist10k --splits 0,1 --seeds 0")
    sub = study.add_subparsers(dest="study", required=True, parser_class=IntermixedParser)
    dead_experts.register(sub)
    loss_scale.register(sub)

    p = sub.add_parser("experts", help="experts used vs number of experts, per regulariser (paper A.10)",
                       description="Train the config at each expert count with each regulariser and seed (one\n"
                                   "moe-dist train process per run, or stacks), then report experts used, H_u, H_s,\n"
                                   "I(E;Y), error, step time and memory as mean ± std over seeds: study.md, study.csv\n"
                                   "and figures (study_usage, study_error, study_cost, study_selection .png).\n"
                                   "--report-only redoes the report from the finished runs. Details: README, \"Studies\".",
                       epilog="examples:\n  moe-dist study experts --config configs/mnist/vanilla.yaml "
                              "--experts 5,10,15 --seeds 0,1 data.name=mnist10k\n"
                              "  moe-dist study experts --report-only --root docs/results/study_experts --heatmaps 5,15",
                       formatter_class=raw)
    p.add_argument("--config", help="base MoE config, e.g. configs/mnist/vanilla.yaml (not needed with --report-only)")
    p.add_argument("--experts", type=comma_ints, default=None,
                   help="expert counts (default 5,10,15; with --report-only: those under --root)")
    p.add_argument("--regularizers", type=lambda s: [r for r in s.split(",") if r], default=None,
                   help=f"any of {','.join(REGULARIZERS['fmnist'])} (default: lcv,ls for MNIST, all four for "
                        "Fashion-MNIST; with --report-only: those under --root)")
    p.add_argument("--seeds", type=comma_ints, default=None,
                   help="seeds (default 0; with --report-only: those under --root)")
    p.add_argument("--root", default="runs/study_experts", help="folder of the runs and the report")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="start each run under torchrun on N processes (default 1: one process); "
                        "add parallel.ep_size=N to shard the experts")
    p.add_argument("--stack", action="store_true",
                   help="train the runs of each E (regularisers x seeds) as one stack, in one process")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite study.md, study.csv and the figures from the finished runs under "
                        "--root (missing points are listed; --nproc, --stack and overrides are unused)")
    p.add_argument("--heatmaps", type=comma_ints, default=None, metavar="E,E",
                   help="expert counts of the selection heatmaps (default: the smallest and largest E)")
    p.add_argument("--heatmap-regularizers", type=lambda s: [r for r in s.split(",") if r], default=None,
                   metavar="R,R", help="regularisers of the selection heatmaps (default lcv,ls where present)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run")
    p.set_defaults(func=cmd_experts)

    _register_pretrained_gate(sub)


def _register_pretrained_gate(sub: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
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
