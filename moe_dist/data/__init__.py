"""Datasets of the two papers as resident tensors, plus batching and CIFAR augmentation.

`load_dataset(name)` returns a `Dataset` whose splits are normalised float tensors;
`TensorBatches` batches a split reproducibly (resumable, shardable across ranks);
`cifar_augment` is the CIFAR-100 training augmentation. `download` (torchvision, optional
extra) fetches the real files on a machine with network.
"""

from moe_dist.data.augment import cifar_augment
from moe_dist.data.cifar import write_cifar100_fixture
from moe_dist.data.download import download
from moe_dist.data.loader import TensorBatches
from moe_dist.data.registry import DATASETS, Dataset, Split, default_data_root, load_dataset

__all__ = [
    "DATASETS",
    "Dataset",
    "Split",
    "TensorBatches",
    "cifar_augment",
    "default_data_root",
    "download",
    "load_dataset",
    "write_cifar100_fixture",
]
