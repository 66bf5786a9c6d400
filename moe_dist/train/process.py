"""Process-wide settings a run needs before anything is built: threads, determinism, device.

These change the whole process (every trainer in it), so they are made in one place, by
:func:`moe_dist.train.build.build_trainer`, and nowhere else.
"""

from __future__ import annotations

import os

import torch

from moe_dist.config import Config
from moe_dist.errors import ConfigError
from moe_dist.parallel import world_info_from_env

__all__ = ["runs_on_cpu", "process_group_backend", "configure_process", "choose_device"]


def runs_on_cpu(cfg: Config) -> bool:
    """Whether ``cfg`` trains on the CPU (its processes then join a gloo group)."""
    return cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())


def process_group_backend(cfg: Config) -> str | None:
    """The backend a run of ``cfg`` joins the launcher's group with: gloo on CPU, else
    init_distributed's default (NCCL for CUDA tensors, gloo for CPU ones)."""
    return "gloo" if runs_on_cpu(cfg) else None


def _threads_per_process() -> int:
    """torch threads for one of several CPU processes on this node when nobody chose: the
    physical cores shared out (what accelerate set for multi-CPU runs, which moe_dist relied
    on before it stopped creating an Accelerator there), so ranks do not oversubscribe."""
    import psutil

    local = world_info_from_env().local_world_size
    return max(int((psutil.cpu_count(logical=False) or 1) / local), 1)


def configure_process(cfg: Config) -> None:
    """Threads and determinism for this process, as ``cfg`` asks."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    elif runs_on_cpu(cfg) and world_info_from_env().local_world_size > 1 and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(_threads_per_process())
    if cfg.train.deterministic:
        # cuBLAS reads this when it creates its handle, i.e. at the first matrix product
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def choose_device(cfg: Config) -> torch.device:
    """The CPU, or this rank's GPU (init_distributed selected it by local rank)."""
    if runs_on_cpu(cfg):
        return torch.device("cpu")
    if world_info_from_env().distributed:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda")
