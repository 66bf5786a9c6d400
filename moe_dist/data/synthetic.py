"""Chen et al.'s synthetic cluster data (docs/papers.md B.1), generated deterministically on CPU.

Each sample has a label y in {-1, +1} (stored 0/1) and a cluster k in 0..3, and consists of
P = 4 patches of d = 50, randomly permuted, flattened to 200:

  signal          y * alpha * v_k           alpha ~ U(0.5, 2)
  cluster center  beta * c_k                beta  ~ U(1, 2)
  gaussian noise  xi ~ N(0, sigma^2 I_50)
  feature noise   eps * gamma * v_k'        k' uniform among the other 3 clusters, eps = +-1

with v_1..v_4, c_1..c_4 orthonormal (sequential Gram-Schmidt of Gaussian draws). The whole
input is then multiplied by 10, so signal norms lie in 5..20 and center norms in 10..20.
The notebooks' exact draws cannot be reproduced (their RNG call order is not recorded), so
the data is a deterministic function of the setting and the seed, not a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_dist.errors import DataError

NUM_CLUSTERS = 4
NUM_PATCHES = 4
PATCH_DIM = 50
INPUT_SCALE = 10.0
NUM_TRAIN = 16_000
NUM_TEST = 16_000


@dataclass(frozen=True)
class SyntheticSetting:
    """One row of docs/papers.md B.1's settings table (the only differences between s1..s4)."""

    seed: int
    noise_std: float  # Gaussian sigma per coordinate, before the x10 scaling
    gamma_max: float  # feature-noise gamma ~ U(0.5, gamma_max)


SETTINGS = {
    "s1": SyntheticSetting(seed=12, noise_std=1 / math.sqrt(50), gamma_max=3.0),
    "s2": SyntheticSetting(seed=11, noise_std=2 / math.sqrt(50), gamma_max=3.0),
    "s3": SyntheticSetting(seed=11, noise_std=1 / math.sqrt(50), gamma_max=2.0),
    "s4": SyntheticSetting(seed=11, noise_std=2 / math.sqrt(50), gamma_max=2.0),
}


@dataclass(frozen=True)
class SyntheticData:
    """All 32,000 samples (first half train) and the unit feature/center vectors behind them."""

    x: torch.Tensor  # float32 [N, 200]
    y: torch.Tensor  # int64 [N], 0 for -1 and 1 for +1
    cluster: torch.Tensor  # int64 [N], 0..3
    features: torch.Tensor  # float32 [4, 50], unit v_k
    centers: torch.Tensor  # float32 [4, 50], unit c_k


def _gram_schmidt(draws_KD: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the rows in order (classical GS twice, float64, for 1e-15 residuals)."""
    basis: list[torch.Tensor] = []
    for row in draws_KD.to(torch.float64):
        for _ in range(2):
            for b in basis:
                row = row - (row @ b) * b
        basis.append(row / row.norm())
    return torch.stack(basis)


def generate(setting: str = "s1", data_seed: int | None = None,
             num_samples: int = NUM_TRAIN + NUM_TEST) -> SyntheticData:
    """Draw `num_samples` samples of `setting`; `data_seed` defaults to the table's seed."""
    if setting not in SETTINGS:
        raise DataError(f"synthetic setting {setting!r} unknown; choose one of {', '.join(SETTINGS)}")
    cfg = SETTINGS[setting]
    g = torch.Generator().manual_seed(cfg.seed if data_seed is None else data_seed)
    N = num_samples

    vectors = _gram_schmidt(torch.randn(2 * NUM_CLUSTERS, PATCH_DIM, generator=g)).float()
    features, centers = vectors[:NUM_CLUSTERS], vectors[NUM_CLUSTERS:]

    y_pm = torch.randint(0, 2, (N,), generator=g) * 2 - 1
    k = torch.randint(0, NUM_CLUSTERS, (N,), generator=g)
    alpha = 0.5 + 1.5 * torch.rand(N, generator=g)
    beta = 1.0 + torch.rand(N, generator=g)
    xi = cfg.noise_std * torch.randn(N, PATCH_DIM, generator=g)
    k_other = (k + torch.randint(1, NUM_CLUSTERS, (N,), generator=g)) % NUM_CLUSTERS
    eps = torch.randint(0, 2, (N,), generator=g) * 2 - 1
    gamma = 0.5 + (cfg.gamma_max - 0.5) * torch.rand(N, generator=g)
    order_NP = torch.rand(N, NUM_PATCHES, generator=g).argsort(dim=1)

    patches_NPD = torch.stack([
        (y_pm * alpha)[:, None] * features[k],
        beta[:, None] * centers[k],
        xi,
        (eps * gamma)[:, None] * features[k_other],
    ], dim=1)
    patches_NPD = patches_NPD.gather(1, order_NP[:, :, None].expand(-1, -1, PATCH_DIM))
    x = INPUT_SCALE * patches_NPD.reshape(N, NUM_PATCHES * PATCH_DIM)
    return SyntheticData(x=x, y=(y_pm > 0).long(), cluster=k, features=features, centers=centers)
