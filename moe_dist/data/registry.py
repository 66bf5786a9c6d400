"""Datasets by name: one call returns resident, normalised train and test tensors.

All datasets here fit in memory (the largest, CIFAR-100, is 600 MB as float32), so they are
loaded once as tensors and batched by `TensorBatches`; no DataLoader workers are involved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_dist.config import CHOICES
from moe_dist.data import cifar, combined, synthetic
from moe_dist.data.idx import FASHION_MNIST, MNIST, load_idx_split, load_mnist10k
from moe_dist.errors import DataError

DATASETS = CHOICES["data.name"]
NORMALIZATIONS = CHOICES["data.normalization"]

# "paper": the Normalize constants the reference code uses per dataset (docs/papers.md A.3).
# The combined dataset only appears in Section 4, whose transform is Normalize(0.5, 0.5).
_PAPER_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "mnist10k": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2859,), (0.3530,)),
    "cifar100": ((0.5074, 0.4867, 0.4411), (0.2011, 0.1987, 0.2025)),
    "fmnist_mnist": ((0.5,), (0.5,)),
}


@dataclass
class Split:
    """One split, resident in memory: inputs, labels and (synthetic only) cluster ids."""

    x: torch.Tensor  # float32, normalised; images [N, C, H, W], synthetic [N, 200]
    y: torch.Tensor  # int64 [N]
    cluster: torch.Tensor | None = None  # int64 [N], synthetic cluster 0..3; None otherwise

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        cluster = self.cluster.to(device) if self.cluster is not None else None
        return Split(self.x.to(device), self.y.to(device), cluster)

    def select_classes(self, classes: list[int] | tuple[int, ...]) -> "Split":
        """Only the samples of the given classes, in their original order; labels unchanged
        (docs/papers.md A.6: a pretrained expert sees only its class pair but keeps its full softmax)."""
        keep = torch.isin(self.y, torch.as_tensor(list(classes), device=self.y.device))
        cluster = self.cluster[keep] if self.cluster is not None else None
        return Split(self.x[keep], self.y[keep], cluster)


@dataclass
class Dataset:
    """A loaded dataset and what the trainer needs to know about it."""

    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]  # per sample, e.g. (1, 28, 28), (3, 32, 32), (200,)
    class_names: list[str]
    augment: str = "none"  # "none" | "cifar": flip + reflect-padded crop on train batches (A.3)
    notes: str = ""  # provenance, e.g. which MNIST the combined dataset was built from


def default_data_root() -> str:
    """$MOE_DIST_DATA, else "./data" (where ``moe-dist download`` puts the datasets)."""
    return os.environ.get("MOE_DIST_DATA") or "./data"


def check_name(name: str) -> None:
    """A dataset name this package can load (and download): the config's ``data.name`` values."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _to_float(images_uint8: torch.Tensor, normalization: str, dataset: str) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1], then normalised per channel."""
    x = images_uint8.float().div_(255.0)
    if normalization == "none":
        return x
    if normalization == "half":
        return x.sub_(0.5).div_(0.5)
    mean, std = (torch.tensor(s, dtype=torch.float32).view(-1, 1, 1) for s in _PAPER_STATS[dataset])
    return x.sub_(mean).div_(std)


def _num_kept(size: int, total: int, what: str, dataset: str) -> int:
    """How many leading samples to keep: `size`, or all when 0 (paper Section 4 subsets, A.3)."""
    if size > total:
        raise DataError(f"{dataset}: {what} {size} exceeds the {total} samples available")
    return size or total


def load_dataset(name: str, root: str = "", *, seed: int = 0, setting: str = "s1",
                 train_size: int = 0, test_size: int = 0, normalization: str = "paper",
                 data_seed: int | None = None) -> Dataset:
    """Load `name` from `root` (default: `default_data_root()`) with checksums verified.

    `train_size`/`test_size` > 0 keep the first n samples (docs/papers.md A.3, Section 4:
    first 10,000 train / 2,000 test). `normalization`: "paper" (the reference constants,
    A.3), "half" ((x - 0.5) / 0.5) or "none" ([0, 1]); synthetic data ignores it. `setting`
    (s1..s4) and `data_seed` (default: the setting's seed, B.1) apply to synthetic data only.
    `seed` is the run seed, accepted for a uniform call; every dataset here is a fixed
    function of its files or of `data_seed`, so it does not change the data.
    """
    del seed  # documented above: the data never depends on the run seed
    check_name(name)
    if normalization not in NORMALIZATIONS:
        raise DataError(f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if train_size < 0 or test_size < 0:
        raise DataError(f"{name}: train_size and test_size must be >= 0 (0 = all)")
    data_root = Path(root or default_data_root())

    if name == "synthetic":
        return _synthetic(setting, data_seed, train_size, test_size)
    train, test, class_names, augment, notes = _read_image_files(name, data_root)
    splits = []
    for (images, labels), size, what in ((train, train_size, "train_size"), (test, test_size, "test_size")):
        keep = _num_kept(size, len(labels), what, name)
        images, labels = images[:keep], labels[:keep]
        if images.ndim == 3:  # IDX images are [N, H, W]; models take one channel
            images = images[:, None]
        splits.append(Split(_to_float(images, normalization, name), labels))
    return Dataset(name, splits[0], splits[1], num_classes=len(class_names),
                   input_shape=tuple(splits[0].x.shape[1:]), class_names=class_names,
                   augment=augment, notes=notes)


def _synthetic(setting: str, data_seed: int | None, train_size: int, test_size: int) -> Dataset:
    """Chen et al.'s cluster data of ``setting``, generated in memory (docs/papers.md B.1)."""
    data = synthetic.generate(setting, data_seed)
    n = synthetic.NUM_TRAIN
    splits = []
    for part, size, what in ((slice(0, n), train_size, "train_size"), (slice(n, None), test_size, "test_size")):
        x, y, k = data.x[part], data.y[part], data.cluster[part]
        keep = _num_kept(size, len(y), what, "synthetic")
        splits.append(Split(x[:keep], y[:keep], k[:keep]))
    used_seed = synthetic.SETTINGS[setting].seed if data_seed is None else data_seed
    return Dataset("synthetic", splits[0], splits[1], num_classes=2, input_shape=(200,), class_names=["-1", "+1"],
                   notes=f"setting {setting}, data seed {used_seed} (docs/papers.md B.1)")


def _read_image_files(name: str, data_root: Path) -> tuple[tuple, tuple, list[str], str, str]:
    """(train, test) as (uint8 images, labels) pairs, class names, augmentation and notes of
    an image dataset, read (checksums verified) from its files under ``data_root``."""
    notes, augment = "", "none"
    if name == "mnist":
        train = load_idx_split(MNIST, data_root, "train", name)
        test = load_idx_split(MNIST, data_root, "t10k", name)
        class_names = list(MNIST.class_names)
    elif name == "mnist10k":
        train, test = load_mnist10k(data_root, name)
        class_names = list(MNIST.class_names)
        notes = "first 8,000 / last 2,000 of the real MNIST test set"
    elif name == "fashion_mnist":
        train = load_idx_split(FASHION_MNIST, data_root, "train", name)
        test = load_idx_split(FASHION_MNIST, data_root, "t10k", name)
        class_names = list(FASHION_MNIST.class_names)
    elif name == "cifar100":
        train, test, class_names = cifar.load_cifar100(data_root)
        augment = "cifar"
    else:  # fmnist_mnist
        parts = combined.load_fmnist_mnist(data_root)
        train, test = (parts.train_images, parts.train_labels), (parts.test_images, parts.test_labels)
        class_names = list(combined.CLASS_NAMES)
        notes = parts.notes
    return train, test, class_names, augment, notes
