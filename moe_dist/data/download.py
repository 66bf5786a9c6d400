"""Fetch the real datasets with torchvision, on a machine with network.

The only module that imports torchvision, and only inside `download`: on the build
machines torchvision cannot even be imported next to CPU torch (docs/design.md, "Environment
facts"), so it is the optional extra `moe_dist[vision]`. Files land where `load_dataset`
looks: `<root>/MNIST/raw`, `<root>/FashionMNIST/raw`, `<root>/cifar-100-python`.
"""

from __future__ import annotations

from pathlib import Path

from moe_dist.data.registry import check_name, default_data_root
from moe_dist.errors import DataError

# torchvision dataset classes per name; mnist10k is a split of MNIST's test set, and the
# combined dataset is built from both MNIST and Fashion-MNIST.
_TORCHVISION_CLASSES = {
    "mnist": ("MNIST",),
    "mnist10k": ("MNIST",),
    "fashion_mnist": ("FashionMNIST",),
    "cifar100": ("CIFAR100",),
    "fmnist_mnist": ("FashionMNIST", "MNIST"),
    "synthetic": (),  # generated on the fly (docs/papers.md B.1)
}


def download(name: str, root: str = "") -> list[str]:
    """Download `name` into `root` (default: `default_data_root()`); return the folders written."""
    check_name(name)
    classes = _TORCHVISION_CLASSES[name]
    if not classes:
        return []
    target = Path(root or default_data_root())
    try:
        import torchvision.datasets as tv_datasets
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision built for another torch
        raise DataError(
            f"downloading {name} needs torchvision ({type(exc).__name__}: {exc}); "
            f"run `pip install moe_dist[vision]` then `moe-dist data download {name}`"
        ) from exc
    written = []
    for cls_name in classes:
        for train in (True, False):
            try:
                dataset = getattr(tv_datasets, cls_name)(str(target), train=train, download=True)
            except (OSError, RuntimeError) as exc:
                raise DataError(f"downloading {cls_name} into {target} failed: {exc}") from exc
        # MNIST-style classes keep their files in raw_folder; CIFAR100 in base_folder.
        folder = getattr(dataset, "raw_folder", None) or str(target / dataset.base_folder)
        written.append(folder)
    return written
