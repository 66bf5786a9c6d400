"""The ``moe-dist`` command: parse, build, run, report. The logic lives in moe_dist.train."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from moe_dist.config import CONFIGS
from moe_dist.errors import MoEDistError
from moe_dist.paper import format_summary

DEFAULT_CONFIG = CONFIGS / "synthetic" / "s1_moe_nonlinear.yaml"
EXPERIMENT_COMMANDS: tuple[str, ...] = ("sweep", "report", "distill", "study")  # modules with register(subparsers)


def cmd_train(args: argparse.Namespace) -> int:
    from moe_dist.config import load_config
    from moe_dist.train.build import build_trainer

    config = args.config
    if config is None:
        if not DEFAULT_CONFIG.exists():
            raise MoEDistError(f"no --config given and the default {DEFAULT_CONFIG} is missing "
                               "(install moe_dist from a checkout with `pip install -e .`)")
        config = DEFAULT_CONFIG
    cfg = load_config(config, args.overrides)
    trainer = build_trainer(cfg)
    metrics = trainer.fit()
    if trainer.is_main:
        print(f"\n{cfg.name or Path(config).stem}: {cfg.run_dir}")
        print(format_summary(cfg.name, metrics))
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
        print(format_summary(cfg.name, shown))
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
    parser = argparse.ArgumentParser(prog="moe-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (no arguments: the embedded synthetic default)")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.epochs=5")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a run folder's latest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("data", help="download or inspect a dataset, or write it to webdataset shards")
    p.add_argument("action", choices=("download", "info", "shards"))
    p.add_argument("name")
    p.add_argument("--root", default="", help="dataset folder (default: $MOE_DIST_DATA or ../shared/data)")
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
    # The papers' procedures register their own subcommands (moe_dist/experiments/*.py).
    for module in EXPERIMENT_COMMANDS:
        importlib.import_module(f"moe_dist.experiments.{module}").register(sub)
    importlib.import_module("moe_dist.train.board").register(sub)  # moe-dist tensorboard
    return parser


def main(argv: list[str] | None = None) -> int:
    from moe_dist.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Preempted as exc:  # a checkpoint was written: the same command resumes (slurm/)
        print(f"moe-dist: preempted by {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except MoEDistError as exc:
        print(f"moe-dist: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
