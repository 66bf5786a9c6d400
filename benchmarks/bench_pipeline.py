"""Benchmark the data pipeline: webdataset shards vs in-memory tensors vs a per-sample Dataset.

Each side delivers one epoch of shuffled training batches of the full Fashion-MNIST
(60,000 images, global batch 512) as the model sees them: normalised float32 [B, 1, 28, 28]
inputs, labels and sample indices, in one process (one rank).

* ``dataloader``: a map-style ``Dataset`` that returns one sample at a time (uint8 image
  normalised per sample, as a transform would), batched by ``torch.utils.data.DataLoader``
  (shuffle, default collation): the usual PyTorch pipeline, and the baseline of the ratios.
* ``memory``: ``TensorBatches`` over the resident, pre-normalised split
  (``data.format=memory``, moe_dist's default): one gather per batch.
* ``webdataset``: ``ShardBatches`` (``data.format=webdataset``) over shards written by
  ``moe-dist data shards fashion_mnist``: resampled shards, each shard's sha256 checked
  when read, one tar member per chunk of ``--chunk-size`` samples, chunks then samples
  shuffled in buffers, batches assembled from the readers' blocks.

``--workers 0,2`` also runs the loader sides with that many worker processes (started
anew each epoch, as the trainer does). Before timing, every side's first batch is checked
against the resident tensors (same inputs for the same indices). Sides alternate within a
repeat, so drifts in machine speed hit all of them; the table reports medians. An epoch's
time includes starting its workers.

Run: ``python benchmarks/bench_pipeline.py`` (writes the shards to a temporary folder
first; ``--shards DIR`` reuses a folder written by ``moe-dist data shards fashion_mnist
--out DIR``), or ``--quick`` for a smoke run. Threads: torch's default. The shard readers
work in numpy and never start torch's intra-op threads; on a loaded machine those threads
slow the ``memory`` side's large gathers many times over (a parallel region waits for
descheduled threads), so compare sides on an idle machine too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import moe_dist  # noqa: F401  (installed, or run from the repository root with -m)
except ImportError:  # `python benchmarks/bench_pipeline.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_dist.data import TensorBatches, load_dataset
from moe_dist.data.shards import DEFAULT_CHUNK_SIZE, ShardSet, ShardSplit, write_shards

DATASET = "fashion_mnist"
MEAN, STD = 0.2859, 0.3530  # Fashion-MNIST's Normalize constants (docs/papers.md A.3)


class PerSampleDataset(torch.utils.data.Dataset):
    """One (image, label, index) per call, normalised per sample like a torchvision transform."""

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images_u8, labels
        self.mean = torch.tensor([MEAN]).view(-1, 1, 1)
        self.std = torch.tensor([STD]).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div_(255.0).sub_(self.mean).div_(self.std)
        return x, self.labels[i], i


def make_sides(memory_split, images_u8: torch.Tensor, shards_root: Path, batch: int, workers: list[int]) -> dict:
    """Name -> function that runs one epoch and yields its (x, y, idx) batches."""
    dataset = PerSampleDataset(images_u8, memory_split.y)
    tensor_batches = TensorBatches(memory_split, batch, shuffle=True, seed=0)
    shard_split = ShardSplit(ShardSet(shards_root), "train", "paper")
    sides = {"memory": lambda epoch: tensor_batches.batches(epoch)}
    for w in workers:
        def dataloader(epoch, w=w):
            g = torch.Generator().manual_seed(epoch)
            return iter(torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, generator=g,
                                                    num_workers=w, persistent_workers=False))
        sides[f"dataloader w{w}"] = dataloader
        sides[f"webdataset w{w}"] = (lambda epoch, b=shard_split.batches(batch, seed=0, num_workers=w):
                                     b.batches(epoch))
    return sides


def check(sides: dict, memory_x: torch.Tensor) -> None:
    for name, run in sides.items():
        x, _, idx = next(iter(run(0)))
        if not torch.equal(x, memory_x[idx]):
            raise SystemExit(f"{name}: the first batch differs from the resident tensors")


def time_epochs(sides: dict, repeats: int) -> dict[str, float]:
    """Median samples/s per side over `repeats` epochs."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            samples = sum(len(y) for _, y, _ in run(r + 1))
            rates[name].append(samples / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one repeat, no worker processes")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=0, help="timed epochs per side (0: 3, quick: 1)")
    parser.add_argument("--workers", default="0,2", help="loader worker counts to run, comma-separated")
    parser.add_argument("--shards", default="", help="existing fashion_mnist shard folder (default: write one)")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--chunk-size", type=int, default=0, help="samples per tar member (0: the default)")
    parser.add_argument("--root", default="", help="dataset folder (default: $MOE_DIST_DATA, else ./data)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    workers = [0] if args.quick else [int(w) for w in args.workers.split(",")]

    memory = load_dataset(DATASET, args.root)
    # the files' uint8 bytes, exactly: [0, 1] floats are k / 255
    images_u8 = load_dataset(DATASET, args.root, normalization="none").train.x.mul(255).round().to(torch.uint8)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        root = Path(args.shards or tmp)
        if not args.shards:
            start = time.perf_counter()
            chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
            write_shards(DATASET, root, args.shard_size, chunk_size=chunk_size, root=args.root)
            size_mb = sum(p.stat().st_size for p in root.glob("*.tar")) / 2**20
            print(f"wrote {DATASET} shards ({args.shard_size} samples each in chunks of {chunk_size}, "
                  f"{size_mb:.0f} MB) in {time.perf_counter() - start:.1f} s")
        sides = make_sides(memory.train, images_u8, root, args.batch, workers)
        check(sides, memory.train.x)
        print(f"{DATASET}: one epoch of {len(memory.train)} training samples, batch {args.batch}, one process; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} epochs")
        rates = time_epochs(sides, repeats)
    baseline = f"dataloader w{workers[0]}"
    print(f"{'side':<16} {'samples/s':>11} {'vs ' + baseline:>18}")
    for name, rate in rates.items():
        print(f"{name:<16} {rate:11,.0f} {rate / rates[baseline]:17.2f}x")


if __name__ == "__main__":
    main()
