"""Mini-batches over a resident `Split`, reproducible across resumes and rank counts.

The order of epoch e is a pure function of (seed, e), so a run resumed at (epoch, batch)
replays exactly the batches it would have seen. With data parallelism every rank draws the
same global batch and takes a contiguous share of it, so N ranks together see, in the same
order, what one process sees (docs/design.md choice 4: losses over the global batch must equal
the single-process loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from moe_dist.data.registry import Split
from moe_dist.errors import DataError

# Mixes seed and epoch into one generator seed; a prime keeps (seed, epoch) pairs apart.
_EPOCH_SEED_STRIDE = 1_000_003


class TensorBatches:
    """Batches of `batch_size` samples (the global batch) over `split`, this rank's share.

    `batch_size >= len(split)` gives one full batch per epoch (the synthetic experiments'
    full-batch GD, docs/papers.md B.3). Every rank yields the same number of batches, so
    collectives line up; a rank's share may be empty when the global batch is smaller than
    `world_size`.
    """

    def __init__(self, split: Split, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool = False, *, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside 0..{world_size - 1} (world_size {world_size})")
        self.split = split
        self.batch_size = min(batch_size, len(split)) or 1
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """Sample indices of epoch `epoch` in visiting order (int64, CPU)."""
        n = len(self.split)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * _EPOCH_SEED_STRIDE + epoch)
        return torch.randperm(n, generator=g)

    def _rank_slice(self, global_size: int) -> slice:
        """This rank's contiguous share; sizes differ by at most 1, earlier ranks larger."""
        base, extra = divmod(global_size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def batches(self, epoch: int,
                start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x, y, idx) for batches start_batch.. of `epoch`; idx live on x's device."""
        order = self.order(epoch).to(self.split.x.device)
        for b in range(start_batch, len(self)):
            global_idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            idx = global_idx[self._rank_slice(len(global_idx))]
            yield self.split.x[idx], self.split.y[idx], idx
