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


@pytest.fixture(scope="session")
def data_root() -> str:
    from moe_dist.data import default_data_root

    root = default_data_root()
    if not (Path(root) / "mnist-t10k").exists() and not os.environ.get("MOE_DIST_DATA"):
        pytest.skip(f"real MNIST fixture not found under {root} (set MOE_DIST_DATA)")
    return root


def tiny_synthetic(run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long synthetic MoE run (Chen et al. setting s1, 1,000 samples)."""
    return [f"run_dir={run_dir}", "data.train_size=1000", "data.test_size=500", "train.epochs=4",
            "train.eval_every=1", "train.progress=false", "train.num_threads=1", *extra]


def tiny_mnist(run_dir: Path, root: str, *extra: str) -> list[str]:
    """Overrides for a seconds-long MNIST run on 1,000 real images of the mnist10k split."""
    return [f"run_dir={run_dir}", "data.name=mnist10k", f"data.root={root}", "data.train_size=1000",
            "data.test_size=500", "train.epochs=3", "train.batch_size=128", "train.progress=false",
            "train.num_threads=1", *extra]
