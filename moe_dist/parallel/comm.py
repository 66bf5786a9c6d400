"""The collectives everything outside ``moe_dist.parallel`` may ask for, by name.

Code elsewhere (the training loop, evaluation, preemption, data readers, procedures) never
touches ``torch.distributed``: it calls these, and each is a no-op in a single process, so
one code path serves one process and N ranks. Every function here is collective when a
group of several processes exists: call it at the same point on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_dist.parallel.traffic import count_all_gather, count_all_reduce

__all__ = ["group_exists", "is_distributed", "world_size", "rank", "all_reduce", "all_gather_floats",
           "agree_max_int", "same_on_every_rank"]

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def group_exists() -> bool:
    """Whether this process has joined a process group (possibly a world of one)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """Whether a process group of more than one process exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _backend_device(t: torch.Tensor) -> torch.Tensor:
    """An NCCL-only group reduces CUDA tensors alone; gloo (and cpu:gloo,cuda:nccl) takes CPU ones."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        return t.cuda()
    return t


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` over every rank in place (sum | min | max) and return it; not differentiable
    (the autograd collectives are in ``moe_dist.parallel.collectives``)."""
    if not is_distributed():
        return t
    work = _backend_device(t)
    count_all_reduce("other", work, None)
    dist.all_reduce(work, op=_OPS[op])
    if work is not t:
        t.copy_(work)
    return t


def all_gather_floats(value: float) -> list[float]:
    """Every rank's ``value``, in rank order (``[value]`` in one process)."""
    if not is_distributed():
        return [value]
    mine = _backend_device(torch.tensor([value], dtype=torch.float64))
    gathered = [torch.zeros_like(mine) for _ in range(world_size())]
    count_all_gather("other", mine, None)
    dist.all_gather(gathered, mine)
    return [float(t) for t in gathered]


def agree_max_int(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over the ranks (e.g. the signal any rank received)."""
    if not is_distributed():
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=device)
    return int(all_reduce(flag, "max").item())


def same_on_every_rank(count: int) -> tuple[int, int]:
    """(min, max) of ``count`` over the ranks, in one all-reduce: equal when the ranks agree."""
    bounds = torch.tensor([count, -count], dtype=torch.int64)
    all_reduce(bounds, "min")
    return int(bounds[0]), -int(bounds[1])
