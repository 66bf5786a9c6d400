"""Process-wide settings a run needs before anything is built: threads, determinism, device.

These change the whole process (every trainer in it), so they are made in one place, by
:func:`moe_dist.train.build.build_trainer`, and nowhere else.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from moe_dist.config import Config
from moe_dist.errors import ConfigError
from moe_dist.parallel import world_info_from_env

__all__ = ["runs_on_cpu", "process_group_backend", "keep_freed_memory", "configure_process", "choose_device"]


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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel.

    PyTorch has no caching allocator on the CPU: every activation above glibc's mmap
    threshold is a fresh mmap, and its first touch page-faults in the kernel, which zeroes the
    pages. A Fashion-MNIST MoE step (batch 512) took ~7,000 page faults, ~11 ms of system time
    on a 2-core machine. Serving those sizes from the heap and not trimming it (the peak of a
    step stays resident, as a caching allocator would keep it) removes them. Returns whether
    the C library took the settings (only glibc on Linux has them)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; glibc refuses values above its limits (then nothing changes)
    served_from_heap = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
    kept = mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    return served_from_heap and kept


def configure_process(cfg: Config) -> None:
    """Threads, memory reuse and determinism for this process, as ``cfg`` asks."""
    if runs_on_cpu(cfg):
        keep_freed_memory()
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
