"""``moe-dist stack FILE``: train the runs a stack file lists, grouped into stacks (docs/design.md,
choice 9; ``moe_dist.train.stacked``). ``moe-dist train --seeds`` and ``moe-dist sweep --stack``
come here too.

A stack file (YAML) lists runs, each a config file with overrides, or a distillation from a
source run::

    # moe-dist stack runs.yaml
    runs:
      - {config: configs/fmnist/vanilla.yaml, overrides: [seed=0, run_dir=runs/v/seed0]}
      - {config: configs/fmnist/vanilla_lcv.yaml, overrides: [seed=0, run_dir=runs/lcv/seed0]}
      - {config: configs/fmnist/distilled_lcv.yaml, distill: runs/att/seed0,
         overrides: [run_dir=runs/dist/seed0]}

Runs that share an architecture and schedule train as one stack (at most ``--stack-size``
members; more make several stacks); a run that cannot be stacked trains alone; finished runs
are skipped. Stacks run one after another, training runs before distillations (whose
sources may be among the training runs).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from moe_dist.config import Config, load_config
from moe_dist.errors import ConfigError

__all__ = ["StackEntry", "load_stack_file", "write_stack_file", "plan", "train_entries", "parse_seeds"]

DEFAULT_STACK_SIZE = 16


@dataclass(frozen=True)
class StackEntry:
    """One run of a stack file."""

    config: str  # a distillation: "" for its source's config
    overrides: tuple[str, ...] = ()
    distill: str = ""  # the source run of a distillation ("" for a training run)
    ks: tuple[int, ...] = (1, 2)  # a distillation's top-k evaluations

    def resolve(self) -> Config:
        if self.distill:
            from moe_dist.experiments.distill import distill_config

            return distill_config(self.distill, self.config or None, self.overrides)
        return load_config(self.config, list(self.overrides))


@dataclass
class Plan:
    """Stacks of entries (indices), in run order."""

    entries: list[StackEntry]
    configs: list[Config]
    stacks: list[list[int]] = field(default_factory=list)


def load_stack_file(path: str | Path) -> list[StackEntry]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"stack file {path}: {exc}") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"stack file {path}: needs a non-empty list `runs` of {{config, overrides, distill}}")
    entries = []
    for i, run in enumerate(runs):
        unknown = set(run) - {"config", "overrides", "distill", "ks"} if isinstance(run, dict) else {"?"}
        if unknown or "config" not in run:
            raise ConfigError(f"stack file {path}: runs[{i}] must be a mapping with `config` and optionally "
                              f"`overrides`, `distill`, `ks` (got {run!r})")
        entries.append(StackEntry(str(run["config"]), tuple(str(o) for o in run.get("overrides") or ()),
                                  str(run.get("distill") or ""), tuple(run.get("ks") or (1, 2))))
    return entries


def write_stack_file(path: str | Path, entries: Sequence[StackEntry]) -> None:
    runs = [{"config": e.config, "overrides": list(e.overrides), **({"distill": e.distill, "ks": list(e.ks)}
                                                                     if e.distill else {})} for e in entries]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump({"runs": runs}, sort_keys=False))


def plan(entries: Sequence[StackEntry], stack_size: int = DEFAULT_STACK_SIZE) -> Plan:
    """Resolve every entry's config and group them into stacks of at most ``stack_size``."""
    from moe_dist.train.stacked import stack_groups

    if stack_size < 1:
        raise ConfigError(f"--stack-size {stack_size} must be >= 1")
    configs = [e.resolve() for e in entries]
    run_dirs = [c.run_dir for c in configs]
    if len(set(run_dirs)) != len(run_dirs):
        raise ConfigError(f"each run needs its own run_dir; these repeat: "
                          f"{sorted({d for d in run_dirs if run_dirs.count(d) > 1})}")
    result = Plan(list(entries), configs)
    for group in stack_groups(configs):  # a group too large for one stack: near-equal parts
        size = math.ceil(len(group) / math.ceil(len(group) / stack_size))
        result.stacks += [group[i:i + size] for i in range(0, len(group), size)]
    return result


def _extra_metrics(entry: StackEntry):
    """What a distillation adds to its metrics.json (None for a training run)."""
    if not entry.distill:
        return None
    from moe_dist.experiments.distill import distillation_metrics
    from moe_dist.rundir import RunDir

    return distillation_metrics(RunDir(entry.distill), entry.ks)


def train_plan(p: Plan, say=print) -> list[dict[str, Any]]:
    """Train every stack of ``p``; the runs' metrics in entry order."""
    from moe_dist.train.stacked import build_stacked_trainer

    results: dict[int, dict[str, Any]] = {}
    for number, stack in enumerate(p.stacks):
        names = ", ".join(p.configs[i].run_dir for i in stack)
        say(f"stack {number + 1}/{len(p.stacks)}: {len(stack)} run{'s' if len(stack) > 1 else ''}: {names}")
        extras = [_extra_metrics(p.entries[i]) for i in stack]
        if len(stack) == 1:  # a run alone: the plain trainer (a stack of one only adds overhead)
            from moe_dist.train.build import build_trainer

            results[stack[0]] = build_trainer(p.configs[stack[0]]).fit(extra_metrics=extras[0])
            continue
        trainer = build_stacked_trainer([p.configs[i] for i in stack])
        for i, metrics in zip(stack, trainer.fit(extra_metrics=extras)):
            results[i] = metrics
    return [results[i] for i in range(len(p.entries))]


def train_entries(entries: Sequence[StackEntry], stack_size: int = DEFAULT_STACK_SIZE) -> list[dict[str, Any]]:
    """Plan and train, training runs first, then the distillations (their sources may be
    among the training runs, so their configs resolve only once those have finished)."""
    results: dict[int, dict[str, Any]] = {}
    for distill in (False, True):
        wave = [i for i, e in enumerate(entries) if bool(e.distill) == distill]
        if wave:
            results.update(zip(wave, train_plan(plan([entries[i] for i in wave], stack_size))))
    return [results[i] for i in range(len(entries))]


def parse_seeds(text: str) -> list[int]:
    """``"0-4"``, ``"0,3,7"`` or ``"0-2,9"`` -> the seeds, in order, without repeats."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        low, dash, high = part.partition("-")
        try:
            values = range(int(low), int(high) + 1) if dash else [int(low)]
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: {part!r} is neither a seed nor a range A-B") from None
        seeds += [s for s in values if s not in seeds]
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r} must name non-negative seeds, e.g. 0-9 or 0,1,2")
    return seeds


def cmd_stack(args: argparse.Namespace) -> int:
    entries = load_stack_file(args.stack_file)
    if args.dry_run:
        trains = [e for e in entries if not e.distill]
        p = plan(trains, args.stack_size)
        for number, stack in enumerate(p.stacks):
            print(f"stack {number}: {len(stack)} runs: " + ", ".join(p.configs[i].run_dir for i in stack))
        for e in entries:
            if e.distill:
                print(f"after them, stacked with distillations of the same shape: distill {e.distill}")
        return 0
    from moe_dist.paper import format_summary

    for entry, metrics in zip(entries, train_entries(entries, args.stack_size)):
        cfg = entry.resolve()
        print(f"\n{cfg.run_dir}")
        print(format_summary(cfg, metrics))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stack", help="train the runs of a stack file, stacked where they share an architecture",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stack_file", help="YAML file: runs: [{config, overrides, distill}] (README, \"Stacked runs\")")
    p.add_argument("--stack-size", type=int, default=DEFAULT_STACK_SIZE, metavar="N",
                   help=f"at most N runs per stack (default {DEFAULT_STACK_SIZE})")
    p.add_argument("--dry-run", action="store_true", help="print the stacks without training")
    p.set_defaults(func=cmd_stack)


# ----------------------------------------------------------------------------- sweep --stack


def sweep_stacked(root: str, jobs: Sequence[Any], args: argparse.Namespace) -> int:
    """``moe-dist sweep FILE --stack``: the sweep's jobs as one stack file
    (``{root}/stack.yaml``), trained by one ``moe-dist stack`` subprocess (signals passed on,
    as for a job); then one status line per job. ``--list``/``--dry-run`` print the stacks."""
    import shlex

    from moe_dist.experiments.sweep import LOG_NAME
    from moe_dist.launch import moe_dist_command
    from moe_dist.rundir import RunDir
    from moe_dist.train.preemption import PREEMPTED_EXIT_CODE, Preempted, SignalForwarder

    if args.index is not None or any(job.nproc > 1 for job in jobs):
        raise ConfigError("--stack trains every job in one process: it takes neither --index nor --nproc > 1")
    entries = [StackEntry(job.config, job.overrides, str(job.source or "")) for job in jobs]
    path = Path(root, "stack.yaml")
    command = (*moe_dist_command(1), "stack", str(path), "--stack-size", str(args.stack_size))
    if args.list or args.dry_run:
        _print_stacks(entries, args.stack_size, jobs)
        if args.dry_run:
            print(shlex.join(command))
        return 0
    write_stack_file(path, entries)
    log = Path(root, "stack.log")
    with log.open("a") as out, SignalForwarder() as forwarder:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        code = forwarder.call(command, stdout=out, stderr=out, env={**os.environ, "TQDM_DISABLE": "1"})
    if code == PREEMPTED_EXIT_CODE:
        raise Preempted(forwarder.signum, str(root))
    failed = [job for job in jobs if not RunDir(job.run_dir).finished()]
    for job in jobs:
        print(f"[{job.index}] {job.label} ... {'failed' if job in failed else 'done'}")
    print(f"sweep --stack {root}: {len(jobs) - len(failed)}/{len(jobs)} runs done, {len(failed)} failed"
          + (f" (exit {code}; log: {log}, per run: {LOG_NAME} is not written in stacks)" if failed else ""))
    return 1 if failed or code else 0


def _print_stacks(entries: Sequence[StackEntry], stack_size: int, jobs: Sequence[Any]) -> None:
    labels = {e: job.label for e, job in zip(entries, jobs)}
    trains = [e for e in entries if not e.distill]
    if trains:
        p = plan(trains, stack_size)
        for number, stack in enumerate(p.stacks):
            print(f"stack {number} ({len(stack)} runs): " + ", ".join(labels[trains[i]] for i in stack))
    distills = [e for e in entries if e.distill]
    if distills:
        print(f"then {len(distills)} distillations, stacked by shape once their sources have finished: "
              + ", ".join(labels[e] for e in distills))
