"""``moe-dist sweep``: run the members of a sweep file over seeds and grid points, resumably.

A paper table is tens to hundreds of training runs (docs/papers.md A.5: 5 importance weights x
10 seeds, up to 14 L_s grid points x 10 seeds, a distillation per attentive run). A sweep
file names them once; this command expands it into numbered jobs and runs each job as its
own subprocess, so one crash does not stop the sweep and every job's peak memory and
wall time are its own.

Sweep file (YAML; relative paths are relative to the working directory)::

    # moe-dist sweep configs/sweeps/fmnist_table7.yaml
    root: runs/fmnist          # optional, default runs/sweeps/{file stem}; --root replaces it.
                               # Run folders: {root}/{member}/seed{seed};
                               # grid members: {root}/{member}/{point}/seed{seed}
    seeds: [0, 1, 2]           # optional, default [0]; --seeds replaces it
    nproc: 1                   # optional, default 1: processes per job; --nproc replaces it
    overrides: []              # optional; applied to every member
    members:
      - name: vanilla                      # folder name, unique, no '/'
        config: configs/fmnist/vanilla.yaml
      - name: attentive_lcv_src
        config: configs/fmnist/attentive_lcv.yaml
        overrides: [loss.importance_weight=1.0]
      - name: distilled_lcv
        config: configs/fmnist/distilled_lcv.yaml
        distill: attentive_lcv_src         # an earlier member: runs `moe-dist distill --config FILE
                                           # {root}/attentive_lcv_src/seed{seed} ...` instead of train
      - name: vanilla_lcv_grid
        config: configs/fmnist/vanilla_lcv.yaml
        grid: {loss.importance_weight: [0.2, 0.4, 0.6, 0.8, 1.0]}

Expansion: members in file order, then grid points (the product of the grid's value lists,
in the order written), then seeds; so a distill member runs after its source. A grid
point's folder is ``key=value`` with the key's last dotted part, several keys joined by
``,`` (``importance_weight=0.2``). A distill member makes one job per source run: for a
grid source, one per source grid point and seed, in a folder named after the source's
point (joined by ``,`` with the member's own grid point, if it has a grid).

Overrides are applied in this order: the file's ``overrides``, the member's, the grid
point's, the command line's, then ``run_dir=`` and ``seed=`` (so the folder layout holds).
``config`` and override strings may contain ``{root}`` and ``{seed}``. Every job's config and
overrides are checked before any job runs (and before ``--list`` or ``--dry-run`` prints): a
key that is not a config key, or a value of the wrong type, stops the sweep with one line.

Several processes per job (expert parallelism): with ``--nproc N`` (or ``nproc: N``) > 1 each
job runs under ``python -m torch.distributed.run --standalone --nproc_per_node N
--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m moe_dist.cli ...``: ``--standalone``
gives every job its own rendezvous on a free port (concurrent sweeps do not collide), and
the signal list makes torchrun pass SIGUSR1 on to the ranks instead of dying of it (torch >=
2.9). ``parallel.ep_size`` comes from the config and the overrides as for any run, e.g.
``moe-dist sweep FILE --nproc 2 parallel.ep_size=2``; a layout that cannot work (ep_size not
dividing N, or above the expert count) fails the job with the trainer's one-line error. The
ranks of an MNIST-family or synthetic job follow the single-process run (README, "Several
processes"), distill members included. ``--dry-run`` prints the torchrun commands, ``--list``
marks such jobs.

A job whose run folder is finished (``moe_dist.rundir``: a complete ``metrics.json``) is
skipped; a job with a checkpoint but no finished run is started again and the trainer
resumes it. Each job's output goes to
``sweep.log`` in its run folder (appended); the terminal gets one status line per job.
``--index N`` runs only job N (0-based, as ``--list`` numbers them, for a SLURM array);
the exit status is 1 when any job failed. SIGUSR1/SIGTERM go on to the running job (to
torchrun, which passes them to the ranks and waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` s, 100
unless set, before killing them), which checkpoints and stops; the sweep then starts no more
jobs and exits with 75 (preempted: the same command resumes, ``slurm/sweep_array.sbatch``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from moe_dist.config import merged_config
from moe_dist.errors import ConfigError
from moe_dist.launch import moe_dist_command
from moe_dist.rundir import RunDir
from moe_dist.train.preemption import PREEMPTED_EXIT_CODE, Preempted, SignalForwarder

LOG_NAME = "sweep.log"
ERROR_PREFIX, PREEMPTED_PREFIX = "moe-dist: error:", "moe-dist: preempted by"  # what moe_dist.cli prints


@dataclass
class MemberFile:
    """The schema of one entry of a sweep file's ``members`` (format: module docstring)."""

    name: str = MISSING
    config: str = MISSING
    overrides: list[str] = field(default_factory=list)
    distill: str | None = None
    grid: dict[str, Any] | None = None  # dotted.key -> [values], checked by _grid


@dataclass
class SweepFile:
    """The schema of a sweep file's top level."""

    root: str = ""  # empty: default_root(the file)
    seeds: list[int] = field(default_factory=lambda: [0])
    nproc: int = 1
    overrides: list[str] = field(default_factory=list)
    members: list[Any] = MISSING  # each entry typed as a MemberFile on its own, so errors name it


SWEEP_KEYS = tuple(f.name for f in fields(SweepFile))
MEMBER_KEYS = tuple(f.name for f in fields(MemberFile))
SWEEPS_ROOT = Path("runs", "sweeps")


def default_root(path: Path) -> str:
    """Where a sweep file without ``root`` writes: under runs/, never next to committed results."""
    return str(SWEEPS_ROOT / path.stem)


@dataclass(frozen=True)
class Member:
    """One entry of ``members``: a config, its overrides and optionally a grid or a source."""

    name: str
    config: str
    overrides: tuple[str, ...]
    distill: str | None
    grid: tuple[tuple[str, tuple[Any, ...]], ...]


@dataclass(frozen=True)
class Sweep:
    path: Path
    root: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    members: tuple[Member, ...]
    nproc: int = 1  # processes per job


@dataclass(frozen=True)
class Job:
    """One subprocess (torchrun for several processes): a member at one grid point and seed,
    with its run folder and command."""

    index: int
    member: str
    point: str
    seed: int
    run_dir: Path
    command: tuple[str, ...]
    source: Path | None  # the run a distill job starts from
    nproc: int = 1
    config: str = ""  # the config file and overrides the command trains (for --stack)
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "/".join(part for part in (self.member, self.point, f"seed{self.seed}") if part)

    def status(self) -> str:
        """done (a finished run folder), resumable (a checkpoint, not finished) or pending."""
        run = RunDir(self.run_dir)
        if run.finished():
            return "done"
        if run.has_checkpoint():
            return "resumable"
        return "pending"


def _string_list(value: Any, where: str) -> tuple[str, ...]:
    # OmegaConf types list[str] elements but lets a mapping element through.
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of key=value strings")
    return tuple(value)


def _nproc(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} must be a positive integer (processes per job), not {value!r}")
    return value


def _grid(value: dict[str, Any], where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not value:
        raise ConfigError(f"{where} must be a mapping of dotted.key: [values]")
    grid = []
    for key, values in value.items():
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, (int, float, str)) and "/" not in str(v) for v in values)):
            raise ConfigError(f"{where}: {key} must map to a non-empty list of scalar values")
        grid.append((str(key), tuple(values)))
    short = [key.rsplit(".", 1)[-1] for key, _ in grid]
    if len(set(short)) != len(short):
        raise ConfigError(f"{where}: keys {', '.join(k for k, _ in grid)} share a last part, "
                          "so their point folders would be ambiguous")
    return tuple(grid)


def _typed(schema: type, data: dict[Any, Any], errors: dict[str, str],
           unknown: Callable[[Any], str]) -> dict[str, Any]:
    """``data`` merged into ``schema`` one key at a time, so that a fault names its key: an unknown
    key raises ``unknown(key)``, a value of the wrong type or a missing mandatory one
    ``errors[key]``. Returns the typed values with the defaults filled in, as a plain dict:
    strings stay verbatim (instantiating the dataclass would resolve ``${...}`` in them)."""
    node = OmegaConf.structured(schema)
    for key, value in data.items():
        try:
            node = OmegaConf.merge(node, {key: value})
        except ConfigKeyError:
            raise ConfigError(unknown(key)) from None
        except (OmegaConfBaseException, TypeError):  # TypeError: a list where a mapping belongs
            raise ConfigError(errors[key]) from None
    try:
        return OmegaConf.to_container(node, resolve=False, throw_on_missing=True)  # type: ignore[return-value]
    except MissingMandatoryValue as exc:
        raise ConfigError(errors[str(exc.key)]) from None


def _member(entry: Any, position: int, earlier: dict[str, Member], where: str) -> Member:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: members[{position}] must be a mapping with name and config")
    name = entry.get("name")  # checked first: the other messages name the member
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"{where}: members[{position}] needs a name (a folder name, no '/')")
    not_earlier = (f"{where}: member {name!r} distills {entry.get('distill')!r}, which is not a member "
                   f"defined before it (defined: {', '.join(earlier) or 'none'})")
    member = _typed(MemberFile, entry, {
        "config": f"{where}: member {name!r} needs config: FILE",
        "overrides": f"{where}: {name}.overrides must be a list of key=value strings",
        "distill": not_earlier,
        "grid": f"{where}: {name}.grid must be a mapping of dotted.key: [values]",
    }, lambda key: f"{where}: unknown key {key!r} in member {name!r} (allowed: {', '.join(MEMBER_KEYS)})")
    if name in earlier:
        raise ConfigError(f"{where}: member name {name!r} is used twice")
    if member["distill"] is not None and member["distill"] not in earlier:
        raise ConfigError(not_earlier)
    grid = member["grid"]
    return Member(name, member["config"], _string_list(member["overrides"], f"{where}: {name}.overrides"),
                  member["distill"], _grid(grid, f"{where}: {name}.grid") if grid is not None else ())


def load_sweep(path: str | Path, root: str | Path | None = None) -> Sweep:
    """Parse and check a sweep file; every fault is a one-line ConfigError naming it. ``root``
    (``--root``) replaces the file's ``root``; without either, ``default_root(path)``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with members")
    errors = {
        "root": f"{path}: root must be a folder (the runs go to FOLDER/member/seedN)",
        "seeds": f"{path}: seeds must be a non-empty list of non-negative integers, not {data.get('seeds')!r}",
        "nproc": f"{path}: nproc must be a positive integer (processes per job), not {data.get('nproc')!r}",
        "overrides": f"{path}: overrides must be a list of key=value strings",
        "members": f"{path}: needs members: a non-empty list",
    }
    sweep = _typed(SweepFile, data, errors,
                   lambda key: f"{path}: unknown key {key!r} (allowed: {', '.join(SWEEP_KEYS)})")
    for key, fault in (("members", not sweep["members"]), ("seeds", not sweep["seeds"] or min(sweep["seeds"]) < 0)):
        if fault:
            raise ConfigError(errors[key])
    members: dict[str, Member] = {}
    for position, entry in enumerate(sweep["members"]):
        member = _member(entry, position, members, str(path))
        members[member.name] = member
    if root is not None and not str(root):
        raise ConfigError("--root needs a folder")
    root = str(root) if root is not None else sweep["root"] or default_root(path)
    return Sweep(path, root, tuple(sweep["seeds"]), _string_list(sweep["overrides"], f"{path}: overrides"),
                 tuple(members.values()), _nproc(sweep["nproc"], f"{path}: nproc"))


def _points(member: Member, by_name: dict[str, Member]) -> list[tuple[str, str, list[str]]]:
    """(folder, source folder, overrides) of every point of a member: its grid points (one
    unnamed point without a grid) and, for a distill member, those per point of its source."""
    own = [("", [])]
    if member.grid:
        keys = [key for key, _ in member.grid]
        own = [(",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in zip(keys, values)),
                [f"{key}={value}" for key, value in zip(keys, values)])
               for values in itertools.product(*(values for _, values in member.grid))]
    sources = [folder for folder, _, _ in _points(by_name[member.distill], by_name)] if member.distill else [""]
    return [(",".join(p for p in (source, folder) if p), source, overrides)
            for source in sources for folder, overrides in own]


def _fill(text: str, root: str, seed: int) -> str:
    # Plain replacement, not str.format: override values may contain other braces.
    return text.replace("{root}", root).replace("{seed}", str(seed))


def _check_keys(config: str, overrides: list[str], where: str, checked: set[tuple[str, ...]]) -> None:
    """Refuse at once a key that is not a config key, or a value of the wrong type, which would
    fail every job alike (a value rule, e.g. moe.num_experts=0, stays its job's own failure);
    OmegaConf only, once per distinct config and overrides."""
    if (config, *overrides) in checked:
        return
    try:
        merged_config(config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    checked.add((config, *overrides))


def expand(sweep: Sweep, seeds: tuple[int, ...] | None = None, only: tuple[str, ...] = (),
           overrides: tuple[str, ...] = (), nproc: int | None = None) -> list[Job]:
    """The numbered jobs of a sweep, in run order; checks --only names and config files first.
    ``nproc`` (default: the file's) > 1 runs every job under torchrun on that many processes."""
    nproc = _nproc(sweep.nproc if nproc is None else nproc, "--nproc")
    cli = moe_dist_command(nproc)
    names = [m.name for m in sweep.members]
    for name in only:
        if name not in names:
            raise ConfigError(f"--only {name}: no such member in {sweep.path} (members: {', '.join(names)})")
    by_name = {m.name: m for m in sweep.members}
    jobs: list[Job] = []
    checked: set[tuple[str, ...]] = set()
    for member in sweep.members:
        if only and member.name not in only:
            continue
        for point, source_point, point_overrides in _points(member, by_name):
            for seed in seeds or sweep.seeds:
                config = _fill(member.config, sweep.root, seed)
                if not Path(config).is_file():
                    raise ConfigError(f"{sweep.path}: member {member.name!r}: config file {config} does not exist")
                run_dir = Path(sweep.root, member.name, point, f"seed{seed}")
                args = [_fill(o, sweep.root, seed) for o in (*sweep.overrides, *member.overrides)]
                args += [*point_overrides, *(_fill(o, sweep.root, seed) for o in overrides)]
                _check_keys(config, args, f"{sweep.path}: member {member.name!r}", checked)
                args += [f"run_dir={run_dir}", f"seed={seed}"]
                source = None
                if member.distill:
                    source = Path(sweep.root, member.distill, source_point, f"seed{seed}")
                    # --config before the source: argparse (Python < 3.13) rejects overrides
                    # that follow an option when a positional came before it.
                    command = (*cli, "distill", "--config", config, str(source), *args)
                else:
                    command = (*cli, "train", "--config", config, *args)
                jobs.append(Job(len(jobs), member.name, point, seed, run_dir, command, source, nproc, config,
                                tuple(args)))
    return jobs


def _job_output(log: Path, start: int) -> list[str]:
    """The non-empty lines this session of the job appended to its log (from byte ``start``)."""
    with log.open("rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _error_line(lines: list[str]) -> str:
    """The CLI's one-line error when the job printed one (under torchrun, every rank prints
    it, and torchrun's failure report follows), else the job's last output line."""
    # Two ranks' lines may run together in the log: keep the last error of a line.
    errors = [line[line.rfind(ERROR_PREFIX):] for line in lines if ERROR_PREFIX in line]
    return (errors or lines or ["no output"])[-1][-300:]


def run_job(job: Job, forwarder: SignalForwarder | None = None) -> bool:
    """Run one job (unless done) and print its status line; True unless it failed. Raises
    Preempted when the job stopped on a signal (``forwarder`` passes signals on to it)."""
    print(f"[{job.index}] {job.label} ...", end=" ", flush=True)
    if job.status() == "done":
        print(f"skipped (done: {job.run_dir}/metrics.json)", flush=True)
        return True
    if job.source is not None and not RunDir(job.source).finished():
        print(f"failed: source run {job.source} has not finished (no complete metrics.json)", flush=True)
        return False
    job.run_dir.mkdir(parents=True, exist_ok=True)
    log = job.run_dir / LOG_NAME
    resumed = job.status() == "resumable"
    log_start = log.stat().st_size if log.exists() else 0
    # Progress bars only clutter a log file; the status line reports the job. torchrun waits
    # this long for its ranks' checkpoint after a signal (slurm/train_multinode.sbatch).
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "100")
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {shlex.join(job.command)}\n")
        out.flush()
        code = (forwarder or SignalForwarder()).call(job.command, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    output = _job_output(log, log_start)
    # The ranks exit with 75; torchrun, having been signalled itself, exits with 1 after them.
    preempted = code == PREEMPTED_EXIT_CODE or (
        code != 0 and job.nproc > 1 and any(PREEMPTED_PREFIX in line for line in output))
    if preempted:
        print(f"preempted {seconds:.1f}s (checkpoint written) [log: {log}]", flush=True)
        raise Preempted(forwarder.signum if forwarder else 0, str(job.run_dir))
    if code == 0 and RunDir(job.run_dir).finished():
        print(f"done{' (resumed)' if resumed else ''} {seconds:.1f}s", flush=True)
        return True
    print(f"failed (exit {code}) {seconds:.1f}s: {_error_line(output)} [log: {log}]", flush=True)
    return False


def _seeds_arg(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma-separated list of integers") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r} must list non-negative integers")
    return seeds


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep_file, args.root)
    only = tuple(n for n in (args.only or "").split(",") if n)
    jobs = expand(sweep, _seeds_arg(args.seeds) if args.seeds else None, only, tuple(args.overrides), args.nproc)
    if args.stack:
        from moe_dist.experiments.stacks import sweep_stacked

        return sweep_stacked(sweep.root, jobs, args)
    if args.index is not None:
        if not 0 <= args.index < len(jobs):
            raise ConfigError(f"--index {args.index} is out of range: {len(jobs)} jobs, 0..{len(jobs) - 1}")
        jobs = [jobs[args.index]]
    if args.list:
        for job in jobs:
            procs = f"  ({job.nproc} processes)" if job.nproc > 1 else ""
            print(f"{job.index:>4}  {job.status():<9}  {job.label:<40}  {job.run_dir}{procs}")
        return 0
    if args.dry_run:
        for job in jobs:
            print(f"{'# done: ' if job.status() == 'done' else ''}{shlex.join(job.command)}")
        return 0
    failed = []
    with SignalForwarder() as forwarder:
        for job in jobs:
            if forwarder.signum:  # arrived between jobs: start no more
                raise Preempted(forwarder.signum, str(job.run_dir))
            if not run_job(job, forwarder):
                failed.append(job)
    print(f"sweep {sweep.path}: {len(jobs) - len(failed)}/{len(jobs)} jobs done or skipped, "
          f"{len(failed)} failed" + (f": {', '.join(job.label for job in failed)}" if failed else ""))
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a sweep file's members over seeds and grid points",
                              usage="moe-dist sweep SWEEP_FILE [--root DIR] [--seeds S[,S]] [--only NAME[,NAME]] "
                                    "[--index N] [--nproc N] [--stack [--stack-size N]] [--list | --dry-run] "
                                    "[key=value ...]",
                              description="Run the members of a sweep file (configs, optionally with grids of "
                                          "values) over seeds,\none subprocess per job, resumably: finished "
                                          "runs are skipped, interrupted ones resume.\nThe file format, "
                                          "folder layout and signals: README, \"Sweeps\".",
                              epilog="examples:\n"
                                     "  moe-dist sweep configs/sweeps/synthetic_s1.yaml --list     "
                                     "# the numbered jobs and their status\n"
                                     "  moe-dist sweep configs/sweeps/synthetic_s1.yaml --seeds 0,1 train.epochs=100\n"
                                     "  moe-dist sweep configs/sweeps/mnist10k_table2.yaml --index 3   "
                                     "# job 3 only (a SLURM array task)",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_file", help="YAML sweep file (format: README, \"Sweeps\")")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="folder of the run folders, replacing the file's root (default: runs/sweeps/FILE_STEM)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, replacing the file's seeds")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]", help="run only these members")
    p.add_argument("--index", type=int, default=None, metavar="N", help="run only job N of the list (0-based)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="processes per job, under torchrun when > 1 (default: the file's nproc, else 1); "
                        "add parallel.ep_size=N to shard the experts")
    p.add_argument("--stack", action="store_true",
                   help="train the jobs in one process, stacked where they share an architecture and schedule "
                        "(README, \"Stacked runs\")")
    p.add_argument("--stack-size", type=int, default=16, metavar="N", help="with --stack: at most N runs per stack")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the numbered jobs, run folders and status")
    mode.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    # nargs="+" made optional, not nargs="*": argparse (Python < 3.13) gives a "*" positional
    # its empty match right after SWEEP_FILE and then rejects overrides that follow options.
    overrides = p.add_argument("overrides", nargs="+", default=[], metavar="key=value",
                               help="dotted.key=value overrides for every job")
    overrides.required = False
    p.set_defaults(func=cmd_sweep)
