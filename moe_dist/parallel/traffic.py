"""Bytes this process sends to the other ranks, by kind, counted where the collectives run.

Every collective of ``moe_dist.parallel`` adds what it sends to :data:`SENT` (plain Python
ints from tensor shapes: no extra collective, no device sync), so that the trainer can report
the communication of a training step as the difference of two snapshots. Kinds:

* ``dispatch``: the experts' inputs and outputs and their gradients (the dense/attentive
  all-gather and all-to-all, the top-k rows, gate weights and returned rows);
* ``gradients``: the gradient all-reduce (``grads``);
* ``other``: gate-loss reductions, global BatchNorm, batch layouts, top-k counts and routing
  metadata, and the trainer's small reductions (``comm``).

What is counted:

* all-to-all: the exact payload to other ranks (the rows of this rank's own split stay here);
* all-gather: this rank's block, as sent (padded to the longest block where the blocks differ:
  ``collectives.all_gather_rows`` pads), once to each other rank;
* all-reduce: a *model*, the ring algorithm's ``2 (P - 1) / P x size`` per rank. gloo and
  NCCL choose their algorithm by size and topology (tree, ring, recursive halving), so the
  real figure differs; the ring's is the bandwidth-optimal one and what cost models use.

Not counted: what DeepSpeed sends itself (``engine: deepspeed`` reduces the gradients in its
own engine), and the gloo/NCCL protocol overhead (headers, a ring's intermediate hops).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["KINDS", "Traffic", "SENT", "count_all_reduce", "count_all_gather", "count_all_to_all"]

KINDS = ("dispatch", "gradients", "other")


class Traffic:
    """Bytes sent to other ranks since the process started, per kind."""

    def __init__(self) -> None:
        self.sent = dict.fromkeys(KINDS, 0)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] += nbytes

    def snapshot(self) -> dict[str, int]:
        return dict(self.sent)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """Bytes per kind sent after ``before`` (a :meth:`snapshot`)."""
        return {k: self.sent[k] - before[k] for k in KINDS}


SENT = Traffic()
"""This process's counter (one per process: each rank counts what it sends)."""


def count_all_reduce(kind: str, t: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """An all-reduce of ``t``: the ring model's ``2 (P - 1) / P`` times its bytes."""
    P = dist.get_world_size(group)
    SENT.add(kind, 2 * (P - 1) * t.numel() * t.element_size() // P)


def count_all_gather(kind: str, block: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """An all-gather of ``block`` (this rank's, as sent): once to each other rank."""
    SENT.add(kind, (dist.get_world_size(group) - 1) * block.numel() * block.element_size())


def count_all_to_all(kind: str, x: torch.Tensor, in_splits: Sequence[int] | None,
                     group: dist.ProcessGroup | None) -> None:
    """An all-to-all of the rows of ``x``, ``in_splits[j]`` to rank j (None: equal splits)."""
    P = dist.get_world_size(group)
    rows = x.shape[0] if x.dim() else 1
    if in_splits is None:
        in_splits = [rows // P] * P
    row_bytes = x.numel() * x.element_size() // rows if rows else 0
    SENT.add(kind, (sum(in_splits) - in_splits[dist.get_rank(group)]) * row_bytes)
