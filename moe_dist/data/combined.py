"""The 12-class FashionMNIST+MNIST dataset of the paper's Section 4 (docs/papers.md A.3).

Built as the reference helper builds it: FMNIST classes 0-5 keep labels 0-5, MNIST digits
4-9 become labels 6-11; per source, for each class in order the first ceil(size/6) indices
of that class are kept, concatenated and truncated to `size` (5,000 train, 1,000 test per
source); the split is the FMNIST subset followed by the MNIST subset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_dist.data.idx import (
    FASHION_MNIST,
    MNIST,
    ImagesLabels,
    has_idx_split,
    load_idx_split,
    load_mnist10k,
)

FMNIST_CLASSES = (0, 1, 2, 3, 4, 5)
MNIST_DIGITS = (4, 5, 6, 7, 8, 9)
MNIST_LABEL_OFFSET = 2  # the reference's target transform adds 2 to every MNIST label
TRAIN_SIZE_PER_SOURCE = 5_000
TEST_SIZE_PER_SOURCE = 1_000
CLASS_NAMES = [FASHION_MNIST.class_names[c] for c in FMNIST_CLASSES] + [str(d) for d in MNIST_DIGITS]


def first_per_class(labels_N: torch.Tensor, classes: Sequence[int], size: int) -> torch.Tensor:
    """Indices: the first ceil(size/len(classes)) of each class in order, truncated to size.

    A class with fewer samples contributes all it has (the helper's slicing does the same).
    """
    per_class = math.ceil(size / len(classes))
    chosen = [torch.nonzero(labels_N == c).flatten()[:per_class] for c in classes]
    return torch.cat(chosen)[:size]


def _combine(fmnist: ImagesLabels, mnist: ImagesLabels, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The FMNIST subset followed by the relabelled MNIST subset; also the MNIST count."""
    fm_idx = first_per_class(fmnist[1], FMNIST_CLASSES, size)
    mn_idx = first_per_class(mnist[1], MNIST_DIGITS, size)
    images = torch.cat([fmnist[0][fm_idx], mnist[0][mn_idx]])
    labels = torch.cat([fmnist[1][fm_idx], mnist[1][mn_idx] + MNIST_LABEL_OFFSET])
    return images, labels, len(mn_idx)


@dataclass(frozen=True)
class CombinedSplits:
    """uint8 images [N, 28, 28] and labels 0..11 of both splits, plus which MNIST was used."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    notes: str


def load_fmnist_mnist(root: Path) -> CombinedSplits:
    """Build the combined dataset from Fashion-MNIST and MNIST files under root.

    The MNIST half comes from full MNIST when its training files are present; otherwise
    from the mnist10k split (train half from its 8,000 training images, test half from its
    2,000 test images), which has fewer than 834 images of each digit 4-9, so that half of
    the training set is smaller than the paper's 5,000 (the notes say so).
    """
    fm_train = load_idx_split(FASHION_MNIST, root, "train", "fmnist_mnist")
    fm_test = load_idx_split(FASHION_MNIST, root, "t10k", "fmnist_mnist")
    if has_idx_split(MNIST, root, "train"):
        mn_train = load_idx_split(MNIST, root, "train", "fmnist_mnist")
        mn_test = load_idx_split(MNIST, root, "t10k", "fmnist_mnist")
        source = "full MNIST train/test"
    else:
        mn_train, mn_test = load_mnist10k(root, "fmnist_mnist")
        source = "the mnist10k split (first 8,000 / last 2,000 of the MNIST test set; full MNIST absent)"

    train_x, train_y, mnist_train = _combine(fm_train, mn_train, TRAIN_SIZE_PER_SOURCE)
    test_x, test_y, mnist_test = _combine(fm_test, mn_test, TEST_SIZE_PER_SOURCE)
    notes = (
        f"FMNIST classes 0-5 from Fashion-MNIST train/test; MNIST digits 4-9 from {source}; "
        f"MNIST half {mnist_train} train / {mnist_test} test samples"
    )
    return CombinedSplits(train_x, train_y, test_x, test_y, notes)
