"""The ``moe-dist`` command: parse, build, run, report. The logic lives in moe_dist.train."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from moe_dist import cli_help, config_cli
from moe_dist.config import CHOICES, CONFIGS
from moe_dist.errors import MoEDistError
from moe_dist.paper import format_summary

DEFAULT_CONFIG = CONFIGS / "synthetic" / "s1_moe_nonlinear.yaml"
EXPERIMENT_COMMANDS: tuple[str, ...] = ("sweep", "stacks", "report", "distill", "study")  # modules with register(subparsers)
RAW = cli_help.RAW


class VersionAction(argparse.Action):
    """``--version``: moe_dist's and torch's installed versions, looked up only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of moe-dist and torch and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    """``moe-dist 0.1.0 (torch 2.13.0+cpu, Python 3.11.7)``, from the installed distributions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"moe-dist {installed('moe_dist')} (torch {installed('torch')}, Python {sys.version.split()[0]})"


def cmd_train(args: argparse.Namespace) -> int:
    from moe_dist.config import load_config
    from moe_dist.parallel import is_main
    from moe_dist.rundir import RunDir
    from moe_dist.train.build import build_trainer

    config = args.config
    if config is None:
        if not DEFAULT_CONFIG.exists():
            raise MoEDistError(f"no --config given and the default {DEFAULT_CONFIG} is missing "
                               "(install moe_dist from a checkout with `pip install -e .`)")
        config = DEFAULT_CONFIG
    cfg = load_config(config, args.overrides)
    if cfg.name.rpartition("/")[2].startswith("distilled") and not cfg.train.init_from:
        raise MoEDistError(f"{config} is a distillation config ({cfg.name}): run it with "
                           f"`moe-dist distill SOURCE_RUN --config {config}` (SOURCE_RUN: its attentive run)")
    if args.seeds:
        return _train_seeds(args, str(config), cfg)
    if args.overwrite and is_main():
        RunDir(cfg.run_dir).clear()
    trainer = build_trainer(cfg)
    metrics = trainer.fit()
    if trainer.is_main:
        print(f"\n{cfg.name or Path(config).stem}: {cfg.run_dir}")
        print(format_summary(cfg, metrics))
    return 0


def _train_seeds(args: argparse.Namespace, config: str, cfg) -> int:
    """``train --seeds``: one run per seed in ``run_dir/seed{S}`` (a sweep's layout), stacked."""
    from moe_dist.experiments.stacks import StackEntry, parse_seeds, train_entries
    from moe_dist.rundir import RunDir

    seeds = parse_seeds(args.seeds)
    entries = [StackEntry(config, (*args.overrides, f"seed={s}", f"run_dir={cfg.run_dir}/seed{s}")) for s in seeds]
    if args.overwrite:
        for s in seeds:
            RunDir(f"{cfg.run_dir}/seed{s}").clear()
    for seed, metrics in zip(seeds, train_entries(entries, args.stack_size)):
        print(f"\n{cfg.name or Path(config).stem} seed {seed}: {cfg.run_dir}/seed{seed}")
        print(format_summary(cfg, metrics))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moe_dist.rundir import RunDir
    from moe_dist.train.build import evaluate_run

    run = RunDir(args.run_dir)
    cfg, metrics = evaluate_run(run, args.split)
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        shown = {("test_error" if k == "error" else k): v for k, v in metrics.items()}
        print(f"{cfg.name or run.path.name} ({args.split} set, {metrics['num_samples']} samples)")
        print(format_summary(cfg, shown, split=args.split))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from moe_dist.data import load_dataset
    from moe_dist.data.download import download

    if args.action == "shards":
        return _write_shards(args)
    if args.action == "download":
        download(args.name, args.root)
    data = load_dataset(args.name, args.root)
    print(f"{data.name}: {len(data.train)} train / {len(data.test)} test, {data.num_classes} classes, "
          f"input {tuple(data.input_shape)}")
    return 0


def _write_shards(args: argparse.Namespace) -> int:
    from moe_dist.data.shards import write_shards

    if not args.out:
        raise MoEDistError("moe-dist data shards needs --out DIR (the shard folder to write)")
    manifest = write_shards(args.name, args.out, args.shard_size, chunk_size=args.chunk_size, root=args.root,
                            setting=args.setting, data_seed=None if args.data_seed < 0 else args.data_seed,
                            train_size=args.train_size, test_size=args.test_size)
    parts = [f"{split} {info['num_samples']} samples in {len(info['shards'])} shards"
             for split, info in manifest["splits"].items()]
    print(f"{args.name}: {', '.join(parts)} -> {args.out} (manifest.json); "
          f"train on them with data.format=webdataset data.root={args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-dist", description=cli_help.DESCRIPTION,
        formatter_class=lambda prog: RAW(prog, max_help_position=20),  # room for "tensorboard"
        epilog="examples, one per command:\n" + "\n".join(f"  {line}" for line in cli_help.EXAMPLES.values()))
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                                help="moe-dist COMMAND --help: its options and examples")
    p = sub.add_parser("train", help="train one config (no arguments: the embedded synthetic default)",
                       formatter_class=RAW, description=cli_help.TRAIN_DESCRIPTION, epilog=cli_help.TRAIN_EXAMPLES)
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=5")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what run_dir holds (checkpoints, metrics.json) and train it again from scratch")
    p.add_argument("--seeds", default=None, metavar="S",
                   help="train one run per seed (e.g. 0-9 or 0,3,7) in run_dir/seed{S}, stacked in one process")
    p.add_argument("--stack-size", type=int, default=16, metavar="N", help="with --seeds: at most N runs per stack")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a run folder's latest checkpoint", formatter_class=RAW,
                       description="Exact metrics of a run's latest checkpoint over a whole split.",
                       epilog=f"example:\n  {cli_help.EXAMPLES['eval']} --split train")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.set_defaults(func=cmd_eval)
    _add_data_parser(sub)
    config_cli.register(sub)  # moe-dist config keys|list|show
    # The papers' procedures register their own subcommands (moe_dist/experiments/*.py).
    for module in EXPERIMENT_COMMANDS:
        importlib.import_module(f"moe_dist.experiments.{module}").register(sub)
    importlib.import_module("moe_dist.train.board").register(sub)  # moe-dist tensorboard
    for name, command in sub.choices.items():
        command.description = cli_help.DESCRIPTIONS.get(name, command.description)
        if command.epilog is None:  # an example for the commands registered without one
            command.epilog, command.formatter_class = f"example:\n  {cli_help.EXAMPLES[name]}", RAW
    return parser


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    datasets = "\n".join(f"  {name:<14} {cli_help.DATASET_NOTES.get(name, '')}".rstrip()
                         for name in CHOICES["data.name"])
    p = sub.add_parser("data", help="download or inspect a dataset, or write it to webdataset shards",
                       formatter_class=RAW, description=cli_help.DATA_DESCRIPTION,
                       epilog=f"datasets (NAME, the config's data.name):\n{datasets}\n\n{cli_help.DATA_EXAMPLES}")
    p.add_argument("action", choices=("download", "info", "shards"), metavar="ACTION", help="download | info | shards")
    p.add_argument("name", metavar="NAME", help="a dataset (below)")
    p.add_argument("--root", default="", help="dataset folder (default: $MOE_DIST_DATA, else ./data)")
    shards = p.add_argument_group("shards", "write train-NNNNNN.tar, test-NNNNNN.tar and manifest.json")
    shards.add_argument("--out", default="", help="shard folder to write")
    shards.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    shards.add_argument("--chunk-size", type=int, default=256,
                        help="samples per tar member (one record array; readers shuffle chunks, then samples)")
    shards.add_argument("--setting", default="s1", help="synthetic only: setting s1..s4")
    shards.add_argument("--data-seed", type=int, default=-1, help="synthetic only: data seed (-1: the setting's)")
    shards.add_argument("--train-size", type=int, default=0, help="keep the first N training samples (0: all)")
    shards.add_argument("--test-size", type=int, default=0, help="keep the first N test samples (0: all)")
    p.set_defaults(func=cmd_data)


def _collective_error(exc: RuntimeError) -> MoEDistError | None:
    """The one-line error of a collective that timed out or lost a rank (None: another
    error), after leaving the broken group: a gloo group left to the interpreter's exit can
    abort it (docs/design.md, environment facts), which would bury the line in a core dump."""
    if "torch.distributed" not in sys.modules:  # no collective can have run
        return None
    from moe_dist.parallel import collective_failure, destroy_distributed

    error = collective_failure(exc)
    if error is not None:
        destroy_distributed()
    return error


def main(argv: list[str] | None = None) -> int:
    from moe_dist.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Preempted as exc:  # a checkpoint was written: the same command resumes (slurm/)
        print(f"moe-dist: preempted by {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:  # a second Ctrl+C (the first checkpoints, as SIGTERM does)
        print("moe-dist: interrupted; nothing written since the last checkpoint", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a collective outside a trainer's fit (which raises CollectiveError itself)
        error = _collective_error(exc)
        if error is None:
            raise
        print(f"moe-dist: error: {error}", file=sys.stderr)
        return 2
    except MoEDistError as exc:
        print(f"moe-dist: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `moe-dist ... | head` closed the pipe: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
