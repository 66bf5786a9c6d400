"""Preflight checks of the launch scripts (``launchers/*.sh``): a launch that cannot work stops
here, before any process starts, with one line that names the problem.

The scripts call ``python -m moe_dist.launch --script NAME --device cuda|cpu ... -- OVERRIDES``
with their environment variables; on success it prints the number of processes per machine
(``NUM_PROCESSES=0`` resolves to one per GPU), on failure ``NAME: error: ...`` on stderr and
exit status 2. Checked: the numbers (processes, machines, node rank, port), the device (a GPU
launcher on a machine without enough GPUs), the accelerate config file, the training config
with its overrides (unknown keys, bad values), ``parallel.ep_size`` against the world size and
the expert count (at most E; it need not divide E), and for ``engine=deepspeed`` the ZeRO
stage, that ``parallel.ep_size`` divides the expert count, and that DeepSpeed is installed.

Also :func:`moe_dist_command`: the command line that starts ``moe-dist`` on N local
processes, for the procedures that start training processes themselves (sweep, study).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moe_dist.errors import ConfigError, MoEDistError

__all__ = ["LaunchPlan", "preflight", "main", "moe_dist_command", "TORCHRUN_SIGNALS"]

LAUNCHERS = ("accelerate", "torchrun")
DEVICES = ("cuda", "cpu")
#: torchrun's default list plus SIGUSR1: without it torchrun (torch >= 2.9) dies of the SLURM
#: warning signal and leaves its ranks running; with it, it passes the signal on to them.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def moe_dist_command(nproc: int = 1) -> tuple[str, ...]:
    """``python -m moe_dist.cli`` in one process, or under torchrun on ``nproc`` processes of
    this machine. ``--standalone`` gives each launch its own rendezvous on a free port, so
    concurrent sweeps never share one; the ranks read RANK/WORLD_SIZE (moe_dist.parallel.env)
    and the trainer picks gloo on CPU, NCCL on GPUs. torchrun passes SIGUSR1/SIGTERM on to the
    ranks, then waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` s (default 30) before killing them."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be a positive integer")
    if nproc == 1:
        return (sys.executable, "-m", "moe_dist.cli")
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            f"--signals-to-handle={TORCHRUN_SIGNALS}", "-m", "moe_dist.cli")


@dataclass(frozen=True)
class LaunchPlan:
    """What a launch script is about to start (its environment variables, parsed)."""

    device: str = "cuda"
    """cuda (one process per GPU) | cpu (gloo, processes share the cores)."""
    num_processes: int = 1
    """Processes per machine; 0 = one per GPU (cuda only)."""
    num_machines: int = 1
    """Machines (nodes) in the job."""
    node_rank: int = 0
    """This machine's index, 0 .. num_machines - 1."""
    main_port: int = 29500
    """Rendezvous port on the main machine."""
    launcher: str = "accelerate"
    """accelerate | torchrun: which program starts the processes."""
    accelerate_config: str = ""
    """accelerate config file (accelerate launcher only)."""
    config: str = ""
    """The training config file (moe-dist train --config)."""
    overrides: tuple[str, ...] = field(default_factory=tuple)
    """dotted.key=value overrides, as the training command receives them."""


def _int(name: str, value: str | int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_accelerate_config(path: str) -> None:
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"ACCELERATE_CONFIG={path} does not exist")
    settings = yaml.safe_load(Path(path).read_text()) or {}
    if str(settings.get("distributed_type", "")).upper() == "DEEPSPEED":
        # accelerate's plugin would build its own DeepSpeed engine around the model, blind to
        # the expert-parallel groups; ours is selected in the training config.
        raise ConfigError(f"ACCELERATE_CONFIG={path} selects accelerate's DeepSpeed plugin; use "
                          "launchers/deepspeed.sh (engine=deepspeed parallel.zero_stage=N) instead")


def preflight(plan: LaunchPlan, gpu_count: int | None = None) -> int:
    """Raise ConfigError (one line) unless ``plan`` can run; return the processes per machine.

    ``gpu_count`` defaults to the GPUs torch sees on this machine.
    """
    from moe_dist.config import load_config
    from moe_dist.parallel.groups import check_layout

    if plan.device not in DEVICES:
        raise ConfigError(f"DEVICE={plan.device!r} is not one of: {', '.join(DEVICES)}")
    if plan.launcher not in LAUNCHERS:
        raise ConfigError(f"LAUNCHER={plan.launcher!r} is not one of: {', '.join(LAUNCHERS)}")
    if plan.num_machines < 1:
        raise ConfigError(f"NUM_MACHINES={plan.num_machines} must be a positive integer")
    if not 0 <= plan.node_rank < plan.num_machines:
        raise ConfigError(f"NODE_RANK={plan.node_rank} is outside 0..{plan.num_machines - 1} "
                          f"(NUM_MACHINES={plan.num_machines})")
    if not 1 <= plan.main_port <= 65535:
        # 0 ("any free port") would let every machine pick its own (docs/launching.md, A4)
        raise ConfigError(f"MAIN_PORT={plan.main_port} is not a port number (1-65535)")
    nproc = plan.num_processes
    if nproc < 0:
        raise ConfigError(f"NUM_PROCESSES={nproc} must be a positive integer (0: one per GPU)")
    if nproc == 0 and plan.device == "cpu":
        raise ConfigError("NUM_PROCESSES=0 means one process per GPU; DEVICE=cpu needs a number of processes")
    if plan.device == "cuda":
        gpus = _gpu_count() if gpu_count is None else gpu_count
        if gpus == 0:
            raise ConfigError("this launcher needs a CUDA GPU and torch finds none on this machine; "
                              "use launchers/cpu.sh (or DEVICE=cpu) to run on CPU processes")
        nproc = nproc or gpus
        if nproc > gpus:
            raise ConfigError(f"NUM_PROCESSES={nproc} exceeds the {gpus} GPU{'s' * (gpus > 1)} "
                              "of this machine (one process per GPU)")
    if plan.launcher == "accelerate" and plan.accelerate_config:
        _check_accelerate_config(plan.accelerate_config)
    cfg = load_config(plan.config or None, list(plan.overrides))
    world = nproc * plan.num_machines
    check_layout(world, cfg.parallel.ep_size, cfg.moe.num_experts if cfg.model.kind == "moe" else None)
    if cfg.engine == "deepspeed":
        from moe_dist.parallel.deepspeed_engine import check_even_experts, check_zero_stage

        check_zero_stage(cfg.parallel.zero_stage)
        if cfg.model.kind == "moe":
            check_even_experts(cfg.parallel.ep_size, cfg.moe.num_experts)
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'")
    return nproc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_dist.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--script", default="moe_dist.launch", help="the launcher's name, for messages")
    p.add_argument("--device", default="cuda")
    p.add_argument("--num-processes", default="1", help="per machine; 0 = one per GPU")
    p.add_argument("--num-machines", default="1")
    p.add_argument("--node-rank", default="0")
    p.add_argument("--main-port", default="29500")
    p.add_argument("--launcher", default="accelerate")
    p.add_argument("--accelerate-config", default="")
    p.add_argument("--config", default="", help="training config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = LaunchPlan(device=args.device, num_processes=_int("NUM_PROCESSES", args.num_processes),
                          num_machines=_int("NUM_MACHINES", args.num_machines),
                          node_rank=_int("NODE_RANK", args.node_rank),
                          main_port=_int("MAIN_PORT", args.main_port), launcher=args.launcher,
                          accelerate_config=args.accelerate_config, config=args.config,
                          overrides=tuple(args.overrides))
        print(preflight(plan))
    except MoEDistError as exc:
        print(f"{args.script}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
