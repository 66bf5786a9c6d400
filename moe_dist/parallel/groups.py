"""Expert-parallel and expert-data-parallel process groups (docs/design.md, choice 3).

Every rank holds a distinct share of the global batch (data parallelism over the whole
world). The world is cut into blocks of ``ep_size`` consecutive ranks, the expert-parallel
(EP) groups: the ranks of one block share the E experts in contiguous blocks of global ids
whose sizes differ by at most one, larger blocks first (:func:`expert_blocks`; E = 5 on 2
ranks: 0-2 | 3-4; on 4 ranks: 0-1 | 2 | 3 | 4), so ``ep_size`` need not divide E (it must
not exceed it: every rank holds at least one expert). This is the rule by which the batch is
split over ranks too. Ranks with the same ``ep_rank`` in different blocks hold the same
experts (the same block, hence the same shapes): they form the
expert-data-parallel (EDP) groups, over which expert gradients are summed. Consecutive
blocks keep the all-to-all inside a node when ``ep_size`` divides the processes per node.

World 4, ep_size 2: EP groups {0, 1}, {2, 3}; EDP groups {0, 2}, {1, 3}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from moe_dist.config import check_ep_size
from moe_dist.errors import ConfigError

__all__ = ["ParallelContext", "check_layout", "expert_blocks"]


def expert_blocks(num_experts: int, ep_size: int, unit: int = 1) -> list[range]:
    """The global expert ids of each EP rank: contiguous, in rank order, sizes differing by
    at most one with the larger blocks first (5 experts on 2 ranks: 3 + 2; on 4: 2 + 1 + 1 + 1).

    ``unit`` consecutive experts form an indivisible group that lives on one rank (hierarchical
    routing's groups): the E / unit groups are split by the same rule (20 experts in 4 groups
    on 3 ranks: groups 2 + 1 + 1, experts 10 + 5 + 5).

    Contiguous blocks in rank order keep a gathered state in global id order (``state``) and
    let the top-k dispatch send pairs sorted by expert id as one split per rank."""
    if unit < 1 or num_experts % unit:
        raise ValueError(f"{num_experts} experts do not split into groups of {unit}")
    if unit == 1:
        check_ep_size(ep_size, num_experts)
    elif ep_size > num_experts // unit:
        raise ConfigError(f"parallel.ep_size={ep_size} exceeds moe.num_groups={num_experts // unit}: "
                          "a group of experts lives on one rank")
    base, extra = divmod(num_experts // unit, ep_size)
    starts = [unit * (r * base + min(r, extra)) for r in range(ep_size + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(ep_size)]


def check_layout(world_size: int, ep_size: int, num_experts: int | None) -> None:
    """Raise ConfigError unless ``ep_size`` divides the world size and is at most the expert
    count (it need not divide it: blocks are uneven, :func:`expert_blocks`)."""
    if ep_size < 1:
        raise ConfigError(f"parallel.ep_size={ep_size} must be a positive integer")
    if world_size % ep_size:
        raise ConfigError(f"parallel.ep_size={ep_size} does not divide the world size {world_size}: "
                          f"launch a multiple of {ep_size} processes")
    check_ep_size(ep_size, num_experts)


@dataclass
class ParallelContext:
    """This rank's place in the data-, expert- and expert-data-parallel layout.

    Build it with :meth:`create` (all ranks, same arguments, after the default process group
    exists) or :meth:`local` (one process). Groups of one rank are ``None``: nothing to
    communicate.
    """

    rank: int = 0
    world_size: int = 1
    ep_size: int = 1
    ep_group: dist.ProcessGroup | None = None
    """The ranks that share the experts (None when ep_size == 1)."""
    edp_group: dist.ProcessGroup | None = None
    """The ranks holding the same experts (None when world_size == ep_size)."""
    ep_ranks: list[int] = field(default_factory=lambda: [0])
    edp_ranks: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def local(cls) -> ParallelContext:
        return cls()

    @classmethod
    def create(cls, ep_size: int = 1, num_experts: int | None = None) -> ParallelContext:
        """Build the groups of the current default process group (a single process: local)."""
        if not (dist.is_available() and dist.is_initialized()):
            check_layout(1, ep_size, num_experts)
            return cls.local()
        world, rank = dist.get_world_size(), dist.get_rank()
        check_layout(world, ep_size, num_experts)
        ctx = cls(rank=rank, world_size=world, ep_size=ep_size)
        # new_group is collective over the whole world: every rank creates every group, in
        # the same order, and keeps its own.
        if ep_size > 1:
            for start in range(0, world, ep_size):
                ranks = list(range(start, start + ep_size))
                group = dist.new_group(ranks)
                if rank in ranks:
                    ctx.ep_group, ctx.ep_ranks = group, ranks
        else:
            ctx.ep_ranks = [rank]
        if world > ep_size:
            for offset in range(ep_size):
                ranks = list(range(offset, world, ep_size))
                group = dist.new_group(ranks)
                if rank in ranks:
                    ctx.edp_group, ctx.edp_ranks = group, ranks
        else:
            ctx.edp_ranks = [rank]
        return ctx

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        """Position in the EP group: which block of experts this rank holds."""
        return self.rank % self.ep_size

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The data-parallel group: the whole world (None: the default group)."""
        return None

    def expert_blocks(self, num_experts: int, unit: int = 1) -> list[range]:
        """Global expert ids of each rank of the EP group, in group order (``unit``: experts
        that must share a rank, see :func:`expert_blocks`)."""
        check_layout(self.world_size, self.ep_size, num_experts)
        return expert_blocks(num_experts, self.ep_size, unit)

    def expert_counts(self, num_experts: int, unit: int = 1) -> tuple[int, ...]:
        """Experts held by each rank of the EP group, in group order (e.g. (3, 2))."""
        return tuple(len(block) for block in self.expert_blocks(num_experts, unit))

    def local_experts(self, num_experts: int, unit: int = 1) -> range:
        """Global ids of the experts this rank holds."""
        return self.expert_blocks(num_experts, unit)[self.ep_rank]

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}, ep_size {self.ep_size} "
                f"(EP group {self.ep_ranks}, expert-data-parallel group {self.edp_ranks})")
