"""Benchmark the vectorised sample-similarity loss L_s against the expert-pair loop.

Shape legend: B samples, D flattened input features, E experts.

The published code (docs/papers.md A.2.2) evaluates L_s with a Python loop over the E^2 expert
pairs (e, e'), each building a B x B outer product. moe_dist computes the same sums with
one (B x B) @ (B x E) product (``moe_dist.losses.similarity_terms``) and reuses it in the
backward pass. Both paths here run one training-like step: a gate linear layer produces
softmax probabilities, L_s is evaluated and back-propagated into the gate's parameters. The
distance matrix is computed once per batch and is the same for both, so it is timed on its
own: the reference code's ``torch.cdist`` difference kernel ("cdist"), moe_dist's default
float32 Gram matrix of the centred batch with float64 recomputation of ill-conditioned pairs
("gram32") and the float64 Gram matrix ("gram64", see ``sample_distances``). The step ratio
compares whole L_s steps: published (cdist + pair loop) against moe_dist (gram32, or gram64
in the last column, + vectorised sums).

The samples are real images, because how many pairs need recomputing depends on the data
(random vectors are far apart, images of one class are not): by default ``--data mnist10k``,
the MNIST test images shipped in ``tests/data``, normalised as in training; ``fashion_mnist``
reads the full Fashion-MNIST from the data root ($MOE_DIST_DATA, see ``moe_dist.data``);
``random`` draws Gaussian vectors. D = 784 rows are single images; D = 3,072 rows are
CIFAR-like: three different images as the three channels, each padded to 32 x 32 by
repeating its border pixels.

Run: ``python benchmarks/bench_ls.py`` (about a minute on 2 idle CPU cores) or with
``--quick`` for a smoke run. On a shared machine quote ratios of one run, with ``--stat min``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import moe_dist  # noqa: F401  (installed, or run from the repository root with -m)
except ImportError:  # `python benchmarks/bench_ls.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_dist.data import load_dataset
from moe_dist.losses import normalize_distances, sample_distances, sample_similarity_loss

BETA, GAMMA = 1e-6, 1e-6
FULL_CONFIGS = [(5, 512, 784), (20, 256, 3072), (64, 512, 784)]  # (E, B, D)
QUICK_CONFIGS = [(5, 128, 784), (20, 64, 3072), (64, 128, 784)]
FIXTURE_ROOT = Path(__file__).resolve().parents[1] / "tests" / "data"
STAT = statistics.median  # --stat min: the fastest repeat, steadier on a shared machine


def naive_similarity_loss(dist_BB: torch.Tensor, probs_BE: torch.Tensor) -> torch.Tensor:
    """The published code's structure: one B x B outer product per expert pair (e, e')."""
    B, E = probs_BE.shape
    same = probs_BE.new_zeros(())
    diff = probs_BE.new_zeros(())
    for e in range(E):
        for f in range(E):
            pair_sum = torch.sum(dist_BB * torch.outer(probs_BE[:, e], probs_BE[:, f]))
            if e == f:
                same = same + pair_sum
            else:
                diff = diff + pair_sum
    same = same / E
    diff = diff / (E * E - E) if E > 1 else diff
    return (BETA * same - GAMMA * diff) / (B * B)  # the "normalized" variant


def load_images(data: str) -> torch.Tensor | None:
    """Normalised images (N, 1, 28, 28) of ``data``, or None for random vectors."""
    if data == "random":
        return None
    root = str(FIXTURE_ROOT) if data == "mnist10k" else ""  # "": the default data root
    return load_dataset(data, root).train.x


def batch_rows(images: torch.Tensor | None, B: int, D: int, seed: int) -> torch.Tensor:
    """B rows of D features: random images (D = 784), or CIFAR-like rows of three padded
    images (D = 3,072); Gaussian vectors without images."""
    g = torch.Generator().manual_seed(seed)
    if images is None:
        return torch.randn(B, D, generator=g)
    channels = 1 if D == images[0].numel() else 3
    picks = torch.randperm(len(images), generator=g)[:B * channels]
    x = images[picks]
    if channels == 3:
        x = F.pad(x, (2, 2, 2, 2), mode="replicate").reshape(B, 3, 32, 32)
    if x[0].numel() != D:
        raise SystemExit(f"cannot build rows of {D} features from images of {images[0].numel()}")
    return x.reshape(B, D).contiguous()


def timed(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:  # allocator and autograd caches
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return STAT(times)


def check_same_loss(x_BD: torch.Tensor, probs_BE: torch.Tensor) -> None:
    """L_s from our default (float32) distances equals L_s from float64 distances to 1e-4
    relative. The sums are taken in float64 for both: with beta = gamma the two terms of L_s
    nearly cancel, and float32 sums alone differ by 1e-4 whatever the distances."""
    probs64_BE = probs_BE.double()
    ours = sample_similarity_loss(x_BD, probs64_BE, BETA, GAMMA)
    exact = sample_similarity_loss(x_BD.double(), probs64_BE, BETA, GAMMA)
    assert torch.allclose(ours, exact, rtol=1e-4, atol=0), (ours, exact)


def bench_config(x_BD: torch.Tensor, E: int, repeats: int, naive_repeats: int) -> dict:
    torch.manual_seed(0)
    B, D = x_BD.shape
    gate = torch.nn.Linear(D, E)

    def distances(method):
        return normalize_distances(sample_distances(x_BD, method=method))

    dist_BB = distances("gram32")
    assert torch.allclose(dist_BB, distances("cdist"), rtol=1e-5, atol=1e-6)
    check_same_loss(x_BD, torch.softmax(gate(x_BD), dim=1).detach())

    def step(loss_fn):
        def run():
            gate.zero_grad(set_to_none=True)
            probs_BE = torch.softmax(gate(x_BD), dim=1)
            loss = loss_fn(probs_BE)
            loss.backward()
            return loss.detach(), gate.weight.grad.clone()
        return run

    ours = step(lambda p: sample_similarity_loss(None, p, BETA, GAMMA, dist_BB=dist_BB))
    naive = step(lambda p: naive_similarity_loss(dist_BB, p))

    # Same loss and gradient before timing anything (this doubles as the warm-up).
    (l_ours, g_ours) = ours()
    start = time.perf_counter()
    (l_naive, g_naive) = naive()
    if time.perf_counter() - start > 3.0:
        naive_repeats = 1  # keeps the full run under 2 minutes on a slow or busy machine
    assert torch.allclose(l_ours, l_naive, rtol=1e-4, atol=1e-12), (l_ours, l_naive)
    assert torch.allclose(g_ours, g_naive, rtol=1e-3, atol=1e-12 + 1e-3 * float(g_naive.abs().max()))

    return dict(
        gram32=timed(lambda: distances("gram32"), repeats),
        gram64=timed(lambda: distances("gram64"), repeats),
        cdist=timed(lambda: distances("cdist"), max(1, repeats // 2)),
        ours=timed(ours, repeats, warmup=False),
        naive=timed(naive, naive_repeats, warmup=False),
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats")
    parser.add_argument("--data", choices=("mnist10k", "fashion_mnist", "random"), default="mnist10k",
                        help="samples: the MNIST fixture in tests/data (default), the full "
                             "Fashion-MNIST from the data root, or Gaussian vectors")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="statistic of the timed repeats (default: median); min is the "
                             "steadier one when other processes share the cores")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, 0 for torch's default (default: 1). With "
                             "2 threads on a 2-core machine that runs anything else, every small "
                             "op waits ~10 ms for a busy core and the timings are noise")
    return parser.parse_args()


def main() -> None:
    global STAT
    args = parse_args()
    STAT = min if args.stat == "min" else statistics.median
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    repeats = args.repeats or (3 if args.quick else 7)
    naive_repeats = max(1, min(repeats, 3))
    images = load_images(args.data)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, data {args.data}, "
          f"{args.stat} of {repeats} (ours) / up to {naive_repeats} (naive) steps, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("step = gate Linear(D, E) + softmax -> L_s -> backward into the gate")
    header = (f"{'E':>3} {'B':>4} {'D':>5} | {'ours ms':>8} {'naive ms':>9} {'naive/ours':>10} | "
              f"{'gram32 ms':>9} {'gram64 ms':>9} {'cdist ms':>9} | {'step ratio':>10} {'w/ gram64':>9}")
    print(header)
    print("-" * len(header))
    for E, B, D in configs:
        r = bench_config(batch_rows(images, B, D, seed=E), E, repeats, naive_repeats)
        published = r["naive"] + r["cdist"]
        print(f"{E:>3} {B:>4} {D:>5} | {1e3 * r['ours']:8.2f} {1e3 * r['naive']:9.2f} "
              f"{r['naive'] / r['ours']:9.1f}x | {1e3 * r['gram32']:9.2f} {1e3 * r['gram64']:9.2f} "
              f"{1e3 * r['cdist']:9.2f} | {published / (r['ours'] + r['gram32']):9.1f}x "
              f"{published / (r['ours'] + r['gram64']):8.1f}x", flush=True)
    print("ours/naive: L_s step given D (gate forward + L_s + backward); gram32/gram64/cdist: the "
          "distance matrix, once per batch;\nstep ratio = (naive + cdist) / (ours + gram32), published "
          f"code's whole L_s step over moe_dist's (w/ gram64: ours + gram64); load average now "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
