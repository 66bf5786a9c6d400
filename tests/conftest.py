"""Shared fixtures: the real MNIST fixture (md5-verified by the reader) and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, deselected by default (-m slow to run)")
    config.addinivalue_line("markers", "multiprocess: starts several real processes")


# The test data root shipped in the repository (tests/data/README.md): `mnist-t10k/`, the
# 10,000 real MNIST test images that dataset `mnist10k` reads, so no real-data test skips.
TEST_DATA = REPO / "tests" / "data"
MNIST10K_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_FILES = tuple(f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k")
                      for kind in ("images-idx3", "labels-idx1"))


@pytest.fixture(scope="session")
def data_root() -> str:
    """tests/data, the in-repository root that holds `mnist-t10k/`; never skips."""
    missing = [name for name in MNIST10K_FILES if not (TEST_DATA / "mnist-t10k" / name).is_file()]
    assert not missing, f"{TEST_DATA / 'mnist-t10k'} lacks {missing}: the checkout is incomplete"
    return str(TEST_DATA)


@pytest.fixture(scope="session")
def full_data_root() -> str:
    """A data root holding the full Fashion-MNIST (60,000 training images) in `fashion-mnist/`:
    $MOE_DIST_DATA, else `moe_dist.data.default_data_root()`. Skips, saying where the files
    go, when neither has it."""
    from moe_dist.data import default_data_root

    roots = list(dict.fromkeys(r for r in (os.environ.get("MOE_DIST_DATA"), default_data_root()) if r))
    for root in roots:
        if all((Path(root) / "fashion-mnist" / name).is_file() for name in FASHION_FILES):
            return root
    searched = " or ".join(str(Path(r).absolute() / "fashion-mnist") for r in roots)
    pytest.skip(f"needs the full Fashion-MNIST (60,000 images), absent from {searched}: put "
                f"{', '.join(FASHION_FILES)} in <root>/fashion-mnist/ and set MOE_DIST_DATA=<root> "
                f"(on Debian, apt-get install dataset-fashion-mnist provides them)")


def tiny_synthetic(run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long synthetic MoE run (Chen et al. setting s1, 1,000 samples)."""
    return [f"run_dir={run_dir}", "data.train_size=1000", "data.test_size=500", "train.epochs=4",
            "train.eval_every=1", "train.progress=false", "train.num_threads=1", *extra]


def tiny_mnist(run_dir: Path, root: str, *extra: str) -> list[str]:
    """Overrides for a seconds-long MNIST run on 1,000 real images of the mnist10k split."""
    return [f"run_dir={run_dir}", "data.name=mnist10k", f"data.root={root}", "data.train_size=1000",
            "data.test_size=500", "train.epochs=3", "train.batch_size=128", "train.progress=false",
            "train.num_threads=1", *extra]
