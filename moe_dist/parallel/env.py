"""Process discovery: who am I, how many are we, and the process group that joins us.

One place reads the launchers' environment variables (docs/design.md, "Code style": "rank, world and device
discovery in one module; everything else asks ``is_main()``"):

* torchrun and ``accelerate launch --multi_gpu`` (which is torchrun): ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``;
* the ``deepspeed`` launcher: the same, but ``LOCAL_SIZE`` instead of ``LOCAL_WORLD_SIZE``
  (docs/launching.md, T6);
* SLURM (``srun`` one task per process): ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, ``SLURM_NTASKS_PER_NODE``; the rendezvous address is the first host of
  ``SLURM_JOB_NODELIST`` and the port is derived from the job id unless ``MASTER_ADDR`` /
  ``MASTER_PORT`` are set;
* Open MPI / PMI: ``OMPI_COMM_WORLD_*``, ``PMI_RANK``/``PMI_SIZE``.

The node index is computed as ``rank // local_world_size`` rather than read from a
launcher-specific variable (torchrun's c10d rendezvous orders nodes arbitrarily, T2).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from moe_dist.config import ParallelConfig
from moe_dist.errors import ConfigError

__all__ = ["WorldInfo", "world_info_from_env", "init_distributed", "join_process_group", "destroy_distributed",
           "process_group", "barrier", "is_main", "first_slurm_host", "group_timeout", "DEFAULT_TIMEOUT_S"]

#: parallel.timeout_s's default, for callers without a config.
DEFAULT_TIMEOUT_S: float = ParallelConfig.timeout_s
# The timeout init_distributed created the default group with (None: no group, or one that
# accelerate or DeepSpeed created); failure messages quote it, groups made later reuse it.
_group_timeout_s: float | None = None
# torch's defaults for a group made without a timeout (gloo 30 min, NCCL 10 min; the NCCL one
# is None in a build without NCCL), restored when the group is left.
_TORCH_GROUP_TIMEOUTS = {name: getattr(c10d, name, None) for name in ("default_pg_timeout", "default_pg_nccl_timeout")}


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the job."""

    rank: int = 0
    """Global rank, 0 .. world_size - 1."""
    world_size: int = 1
    """Number of processes in the job."""
    local_rank: int = 0
    """Rank among the processes of this node (selects the GPU)."""
    local_world_size: int = 1
    """Processes per node."""
    launcher: str = "none"
    """Which variables were found: torchrun | slurm | mpi | none."""

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = env.get(name, "")
        if value.strip():
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int | None:
    # SLURM_NTASKS_PER_NODE is set only with --ntasks-per-node; SLURM_TASKS_PER_NODE always,
    # in the compressed form "2(x3),1" (first node's count first).
    value = _int(env, "SLURM_NTASKS_PER_NODE")
    if value is not None:
        return value
    tasks = env.get("SLURM_TASKS_PER_NODE", "")
    match = re.match(r"(\d+)", tasks)
    return int(match.group(1)) if match else None


def world_info_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Discover rank and world size from the launcher's environment variables.

    torchrun-style variables win over SLURM ones, so ``srun torchrun ...`` (one launcher per
    node, several workers each) reports the workers' ranks, not the launcher task's.
    """
    env = os.environ if env is None else env
    if _int(env, "RANK") is not None and _int(env, "WORLD_SIZE") is not None:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=None)
        info = WorldInfo(rank=_int(env, "RANK"), world_size=world,
                         local_rank=_int(env, "LOCAL_RANK", default=0),
                         local_world_size=local_world or world, launcher="torchrun")
    elif _int(env, "SLURM_PROCID") is not None and _int(env, "SLURM_NTASKS") is not None:
        world = _int(env, "SLURM_NTASKS")
        info = WorldInfo(rank=_int(env, "SLURM_PROCID"), world_size=world,
                         local_rank=_int(env, "SLURM_LOCALID", default=0),
                         local_world_size=_slurm_tasks_per_node(env) or world, launcher="slurm")
    elif _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK") is not None:
        world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
        info = WorldInfo(rank=_int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK"), world_size=world,
                         local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0),
                         local_world_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                                               default=world),
                         launcher="mpi")
    else:
        info = WorldInfo()
    if not 0 <= info.rank < info.world_size:
        raise ConfigError(f"rank {info.rank} is outside 0..{info.world_size - 1} "
                          f"(launcher variables: {info.launcher})")
    return info


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[03-05,7],gpu1`` -> ``node03``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _export_rendezvous(info: WorldInfo, env: dict) -> None:
    """Fill in RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* so that torch's env:// rendezvous and
    accelerate (which reads them, docs/launching.md A2) see the same world."""
    env.setdefault("RANK", str(info.rank))
    env.setdefault("WORLD_SIZE", str(info.world_size))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    env.setdefault("LOCAL_WORLD_SIZE", str(info.local_world_size))
    if info.launcher == "slurm":
        if "MASTER_ADDR" not in env and env.get("SLURM_JOB_NODELIST"):
            env["MASTER_ADDR"] = first_slurm_host(env["SLURM_JOB_NODELIST"])
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(20000 + _int(env, "SLURM_JOB_ID", default=0) % 20000)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        raise ConfigError("a multi-process run needs MASTER_PORT (torchrun, accelerate launch and "
                          "SLURM set it; export it for other launchers)")


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> WorldInfo:
    """Join the job's default process group if there is more than one process.

    A no-op for a single process and when a group already exists (accelerate or DeepSpeed
    created it). ``backend`` defaults to nccl (CUDA tensors) + gloo (CPU tensors) with CUDA, else gloo.
    ``timeout_s`` (``parallel.timeout_s``) bounds every collective of the group: gloo raises in
    the waiting rank (docs/launching.md, T7), NCCL's watchdog aborts the process. torch's own
    default, 30 min, would let a hung rank hold every device of the job that long.
    """
    global _group_timeout_s
    info = world_info_from_env()
    if not info.distributed or dist.is_initialized():
        if dist.is_initialized() and dist.get_world_size() != info.world_size:
            return WorldInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                             local_rank=info.local_rank, local_world_size=info.local_world_size,
                             launcher=info.launcher)
        return info
    _export_rendezvous(info, os.environ)  # type: ignore[arg-type]
    if backend is None:
        # NCCL for CUDA tensors (dispatch, gradients); gloo for the few CPU tensors the
        # trainer reduces (epoch counts), which an NCCL-only group rejects.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://", rank=info.rank,
                            world_size=info.world_size, timeout=timedelta(seconds=timeout_s))
    _group_timeout_s = timeout_s
    _new_groups_time_out_after(timedelta(seconds=timeout_s))
    return info


def _new_groups_time_out_after(timeout: timedelta | None) -> None:
    """Make ``timeout`` (None: torch's own) the timeout of groups created without one.
    ``dist.new_group`` does not inherit the default group's: it reads torch's module defaults
    at each call, 30 min for gloo (torch 2.13; docs/launching.md, T7), so a rank waiting for a
    hung one in an all-to-all of the expert-parallel groups (moe_dist.parallel.groups) or of
    DeepSpeed's would hold the job that long. Setting the defaults covers every such group."""
    for name, torch_default in _TORCH_GROUP_TIMEOUTS.items():
        if isinstance(torch_default, timedelta):
            setattr(c10d, name, timeout if timeout is not None else torch_default)


def group_timeout() -> timedelta | None:
    """The collective timeout the default group was created with by :func:`init_distributed`
    (None otherwise); groups made after it default to it too (``_new_groups_time_out_after``)."""
    return None if _group_timeout_s is None else timedelta(seconds=_group_timeout_s)


def join_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """:func:`init_distributed`; True when this call created the group, so that the caller
    (and only it) leaves it with :func:`destroy_distributed`."""
    created = not (dist.is_available() and dist.is_initialized())
    init_distributed(backend, timeout_s)
    return created and dist.is_initialized()


def destroy_distributed() -> None:
    """Leave the process group. Without this about one gloo run in ten aborts at exit
    (docs/design.md, environment facts)."""
    global _group_timeout_s
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _group_timeout_s is not None:
        _new_groups_time_out_after(None)
    _group_timeout_s = None


@contextmanager
def process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[WorldInfo]:
    """Hold the launcher's process group for a procedure that builds several trainers in one
    process (distill, the studies). Each Trainer then finds the group and leaves it alone, so
    it is joined once and left once: under torchrun (2.13, gloo) a group destroyed and
    initialised again in the same processes fails about one time in two (a reset connection
    or a hang in the next collective). A no-op in a single process and when a group exists.
    ``timeout_s``: the procedure's ``parallel.timeout_s``, which its trainers then share."""
    created = join_process_group(backend, timeout_s)
    try:
        yield world_info_from_env()
    finally:
        if created:
            destroy_distributed()


def barrier() -> None:
    """Wait until every rank is here (a no-op in one process): after rank 0 wrote a file the
    others read."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_main() -> bool:
    """True on global rank 0 (and in a single process): the rank that writes files and logs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return world_info_from_env().rank == 0
