"""Benchmark the vectorised sample-similarity loss L_s against the expert-pair loop.

Shape legend: B samples, D flattened input features, E experts.

The published code (docs/papers.md A.2.2) evaluates L_s with a Python loop over the E^2 expert
pairs (e, e'), each building a B x B outer product. moe_dist computes the same sums with
one (B x B) @ (B x E) product (``moe_dist.losses.similarity_terms``). Both paths here run
one training-like step: a gate linear layer produces softmax probabilities, L_s is
evaluated and back-propagated into the gate's parameters. The distance matrix is computed
once per batch and is the same for both, so it is timed on its own: the reference code's
``torch.cdist`` difference kernel ("cdist") and moe_dist's default float64-Gram method with
exact recomputation of ill-conditioned pairs ("gram64", see ``sample_distances``). The last
column compares whole L_s steps: published (cdist + pair loop) against moe_dist (gram64 +
vectorised sums).

Run: ``python benchmarks/bench_ls.py`` (about a minute on 2 CPU cores) or with
``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import moe_dist  # noqa: F401  (installed, or run from the repository root with -m)
except ImportError:  # `python benchmarks/bench_ls.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_dist.losses import normalize_distances, sample_distances, sample_similarity_loss

BETA, GAMMA = 1e-6, 1e-6
FULL_CONFIGS = [(5, 512, 784), (20, 256, 3072), (64, 512, 784)]  # (E, B, D)
QUICK_CONFIGS = [(5, 128, 784), (20, 64, 3072), (64, 128, 784)]


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


def median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:  # allocator and autograd caches
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_config(E: int, B: int, D: int, repeats: int, naive_repeats: int) -> dict:
    torch.manual_seed(0)
    x_BD = torch.randn(B, D)
    gate = torch.nn.Linear(D, E)

    def distances(method="gram64"):
        return normalize_distances(sample_distances(x_BD, method=method))

    dist_BB = distances()
    assert torch.allclose(dist_BB, distances("cdist"), rtol=1e-5, atol=1e-6)

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

    t_dist = median_seconds(distances, repeats)
    t_cdist = median_seconds(lambda: distances("cdist"), max(1, repeats // 2))
    t_ours = median_seconds(ours, repeats, warmup=False)
    t_naive = median_seconds(naive, naive_repeats, warmup=False)
    return dict(E=E, B=B, D=D, dist=t_dist, cdist=t_cdist, ours=t_ours, naive=t_naive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, 0 for torch's default (default: 1). With "
                             "2 threads on a 2-core machine that runs anything else, every small "
                             "op waits ~10 ms for a busy core and the timings are noise")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    repeats = args.repeats or (3 if args.quick else 7)
    naive_repeats = max(1, min(repeats, 3))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"median of {repeats} (ours) / up to {naive_repeats} (naive) steps")
    print("step = gate Linear(D, E) + softmax -> L_s -> backward into the gate")
    header = (f"{'E':>3} {'B':>4} {'D':>5} | {'ours ms':>8} {'naive ms':>9} {'naive/ours':>10} | "
              f"{'gram64 ms':>9} {'cdist ms':>9} | {'step ratio':>10}")
    print(header)
    print("-" * len(header))
    for E, B, D in configs:
        r = bench_config(E, B, D, repeats, naive_repeats)
        ratio = r["naive"] / r["ours"]
        ratio_all = (r["naive"] + r["cdist"]) / (r["ours"] + r["dist"])
        print(f"{E:>3} {B:>4} {D:>5} | {1e3 * r['ours']:8.2f} {1e3 * r['naive']:9.2f} {ratio:9.1f}x | "
              f"{1e3 * r['dist']:9.2f} {1e3 * r['cdist']:9.2f} | {ratio_all:9.1f}x", flush=True)
    print("ours/naive: L_s step given D (gate forward + L_s + backward); gram64/cdist: the distance "
          "matrix, once per batch;\nstep ratio = (naive + cdist) / (ours + gram64), published "
          "code's whole L_s step over moe_dist's")


if __name__ == "__main__":
    main()
