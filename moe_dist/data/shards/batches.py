"""Splits and batches of a shard folder: what training and evaluation see.

Owns `ShardSplit` (a split of a shard folder, a `Split` whose tensors are read into memory
on first use), `ShardBatches` (this rank's training batches per epoch, sized as
`TensorBatches` sizes them, assembled from the readers' blocks), the agreement of all ranks
on the sample count, and `load_shards` (the `Dataset` of a shard folder).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from moe_dist.data.registry import Dataset, Split
from moe_dist.data.shards.manifest import ShardSet, _webdataset
from moe_dist.data.shards.reader import BLOCK, Chunk, read_split, training_stream
from moe_dist.errors import DataError
from moe_dist.parallel.comm import same_on_every_rank

_EPOCH_SEED_STRIDE = 1_000_003  # as TensorBatches: keeps (seed, epoch) pairs apart


class ShardSplit(Split):
    """One split of a shard folder. ``len()`` counts the samples of its verified shards;
    ``x``, ``y`` and ``cluster`` read them once, in order, into memory on first use (rows
    in index order, without the skipped shards' samples)."""

    def __init__(self, shard_set: ShardSet, split: str, normalization: str = "paper",
                 device: torch.device | str = "cpu", num_workers: int = 0):
        self.shard_set, self.split_name, self.normalization = shard_set, split, normalization
        self.device = torch.device(device)
        self.num_workers = num_workers
        self._table: Split | None = None

    def __repr__(self) -> str:
        return f"ShardSplit({self.shard_set.root}, {self.split_name!r}, {len(self)} samples)"

    def __len__(self) -> int:
        return sum(s.num_samples for s in self.shard_set.good_shards(self.split_name))

    @property
    def has_cluster(self) -> bool:
        return bool(self.shard_set.manifest["has_cluster"])

    @property
    def x(self) -> torch.Tensor:  # type: ignore[override]
        return self.materialize().x

    @property
    def y(self) -> torch.Tensor:  # type: ignore[override]
        return self.materialize().y

    @property
    def cluster(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.materialize().cluster if self.has_cluster else None

    def to(self, device: torch.device | str) -> "ShardSplit":
        moved = ShardSplit(self.shard_set, self.split_name, self.normalization, device, self.num_workers)
        moved._table = self._table.to(device) if self._table is not None else None
        return moved

    def select_classes(self, classes: list[int] | tuple[int, ...]) -> Split:
        return self.materialize().select_classes(classes)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Split indices -> rows of this split (they differ only after skipped shards)."""
        good = self.shard_set.good_shards(self.split_name)
        if len(good) == len(self.shard_set.shards(self.split_name)):
            return index
        starts = torch.tensor([s.first_index for s in good])
        before = starts - torch.tensor([0] + [s.num_samples for s in good[:-1]]).cumsum(0)  # skipped before each
        shard = torch.searchsorted(starts, index.cpu(), right=True) - 1
        return (index.cpu() - before[shard]).to(index.device)

    def materialize(self) -> Split:
        """The whole split in memory: one exact, in-order pass over the verified shards."""
        if self._table is None:
            chunks = list(read_split(self.shard_set, self.split_name, self.normalization,
                                     num_workers=self.num_workers))
            if not chunks:
                raise DataError(f"{self.shard_set.root}: no sample of the {self.split_name} split could be read")
            index = torch.cat([c.indices for c in chunks])
            order = index.argsort()
            expected = torch.cat([torch.arange(s.first_index, s.first_index + s.num_samples)
                                  for s in self.shard_set.good_shards(self.split_name)])
            if not torch.equal(index[order], expected):
                raise DataError(f"{self.shard_set.root}: the {self.split_name} shards hold {len(index)} samples "
                                f"but their manifest entries promise {len(expected)} (indices differ); "
                                f"re-create them with `moe-dist data shards`")
            x = torch.cat([c.inputs for c in chunks])[order]
            y = torch.cat([c.labels for c in chunks])[order]
            cluster = torch.cat([c.clusters for c in chunks])[order] if self.has_cluster else None
            self._table = Split(x, y, cluster).to(self.device)
        return self._table

    def batches(self, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                num_workers: int | None = None) -> "ShardBatches":
        return ShardBatches(self, batch_size, seed, rank=rank, world_size=world_size,
                            num_workers=self.num_workers if num_workers is None else num_workers)


def _same_on_every_rank(count: int, world_size: int, what: str) -> None:
    """Batch counts come from the verified sample count: ranks that verified different
    shards (node-local copies) would fall out of step, so all of them stop here instead."""
    if world_size == 1:  # no data-parallel peers to fall out of step with
        return
    low, high = same_on_every_rank(count)
    if low != high:
        raise DataError(f"{what}: ranks verified different numbers of samples ({low} to {high}); "
                        f"every rank must read the same shards")


class ShardBatches:
    """Training batches streamed from resampled shards, this rank's share (the interface of
    `TensorBatches`): ``len()`` = ceil(N / batch_size) batches per epoch on every rank, the
    global batches sized as TensorBatches sizes them (the last one may be smaller), each
    rank's share sized by the same contiguous split. Epoch e is a pure function of (seed, e,
    rank, num_workers). Samples are drawn with replacement at the shard level, so one epoch
    need not visit every sample (webdataset's resampled mode); each reader shuffles chunks,
    then samples (module docstring) and hands on blocks of BLOCK samples."""

    def __init__(self, split: ShardSplit, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside 0..{world_size - 1} (world_size {world_size})")
        self.split = split
        self.num_samples = len(split)
        _same_on_every_rank(self.num_samples, world_size, f"{split.shard_set.root} {split.split_name}")
        self.batch_size = min(batch_size, self.num_samples) or 1
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self._empty = Chunk(torch.empty(0, *split.shard_set.manifest["input_shape"], dtype=torch.float32),
                            torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), None)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def share_sizes(self) -> list[int]:
        """This rank's number of samples in each batch of an epoch (TensorBatches' split)."""
        sizes = []
        for b in range(len(self)):
            global_size = min(self.batch_size, self.num_samples - b * self.batch_size)
            base, extra = divmod(global_size, self.world_size)
            sizes.append(base + (self.rank < extra))
        return sizes

    def _stream(self, epoch: int, total: int) -> Iterator[Chunk]:
        """At least `total` samples of this rank's stream for `epoch`, in blocks of BLOCK
        (DataLoader workers take turns, a block each)."""
        shard_set, split_name = self.split.shard_set, self.split.split_name
        workers = max(self.num_workers, 1)
        # Whole blocks from every worker in turn: each worker's quota covers its turns.
        per_worker = math.ceil(total / (BLOCK * workers)) * BLOCK
        # Enough shard draws to fill the quota from the smallest shard, twice over (shards
        # that fail while being read are skipped), and never unbounded.
        draws = 2 * math.ceil(per_worker / min(s.num_samples for s in shard_set.good_shards(split_name))) + 8
        return training_stream(shard_set, split_name, self.split.normalization, draws=draws, samples=per_worker,
                               epoch_seed=self.seed * _EPOCH_SEED_STRIDE + epoch, rank=self.rank,
                               num_workers=self.num_workers)

    def _joined(self, pending: list[Chunk]) -> Chunk:
        """The pending chunks as one (clusters are not needed in training batches)."""
        if len(pending) == 1:
            return pending[0]
        if not pending:  # an empty share (a global batch smaller than world_size)
            return self._empty
        return Chunk(torch.cat([c.inputs for c in pending]), torch.cat([c.labels for c in pending]),
                     torch.cat([c.indices for c in pending]), None)

    def batches(self, epoch: int,
                start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x, y, idx) for batches start_batch.. of `epoch` on the split's device; idx
        are rows of ``self.split`` (the samples' indices when no shard was skipped)."""
        sizes = self.share_sizes()
        total = sum(sizes)
        stream = self._stream(epoch, total) if total else iter(())
        pending: list[Chunk] = []
        have = 0
        device = self.split.device
        for b, size in enumerate(sizes):
            while have < size:
                chunk = next(stream, None)
                if chunk is None:
                    raise DataError(f"{self.split.shard_set.root}: the {self.split.split_name} stream ran dry after "
                                    f"{b} of {len(sizes)} batches of epoch {epoch} (shards failing while read; "
                                    f"see the warnings)")
                pending.append(chunk)
                have += chunk.num_samples
            x, y, index, _ = self._joined(pending)
            rest = have - size
            pending = [Chunk(x[size:], y[size:], index[size:], None)] if rest else []
            have = rest
            if b >= start_batch:
                yield (x[:size].to(device), y[:size].to(device), self.split.rows(index[:size]).to(device))
        del stream  # stops the workers of a DataLoader


def load_shards(root: str, name: str, *, normalization: str = "paper", setting: str = "s1",
                data_seed: int = -1, num_workers: int = 0) -> Dataset:
    """The Dataset of a shard folder: a streamed training `ShardSplit` and the test split
    read into memory (exact evaluation)."""
    _webdataset()
    shard_set = ShardSet(root)
    shard_set.check_matches(name, setting, data_seed)
    m = shard_set.manifest
    train = ShardSplit(shard_set, "train", normalization, num_workers=num_workers)
    test = ShardSplit(shard_set, "test", normalization, num_workers=num_workers).materialize()
    return Dataset(name, train, test, num_classes=int(m["num_classes"]), input_shape=tuple(m["input_shape"]),
                   class_names=list(m["class_names"]), augment=m["augment"],
                   notes=f"webdataset shards in {root}" + (f"; {m['notes']}" if m["notes"] else ""))
