"""Benchmark the expert bank against a Python loop over separate expert modules.

Shape legend: B batch, E experts, C classes.

The reference notebooks (docs/papers.md A.0) keep the experts in a list and call them one by
one; moe_dist stacks them in an expert bank and runs all of them as one computation
(design choice 1, ``moe_dist.models.MnistExpertBank``). Each side trains the same E MNIST
experts (docs/papers.md A.1.1, same initial weights) on the same dense, shared-input batch:
forward, the output mixture with fixed gate probabilities, the mixture NLL, backward and an
Adam step. Three sides:

* ``loop``: a Python loop over ``MnistExpert`` modules (nn.Conv2d, max_pool2d, nn.Linear),
  the paper's way;
* ``loop1``: a Python loop over E one-expert banks: the bank's kernels without the
  batching, to separate what batching gains from what the fused convolution gains;
* ``bank``: one ``MnistExpertBank`` of E experts.

The first step checks that all sides give the same outputs. Steps of the sides alternate,
so drifts in machine speed hit all of them; the table reports medians. Adam is timed with
each of torch's implementations (``foreach=False``, ``foreach=True``, ``fused=True``) on every
side; the "best" row compares each side's fastest.

Run: ``python benchmarks/bench_experts.py`` (about two minutes on 2 CPU cores) or with
``--quick`` for a smoke run. Threads: torch's default (``torch.get_num_threads()``).
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
except ImportError:  # `python benchmarks/bench_experts.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_dist.losses import mixture_nll
from moe_dist.models import MnistExpertBank

ADAM_OPTIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
SIDES = ("loop", "loop1", "bank")


def make_sides(num_experts: int) -> dict:
    """Each side's forward ``x -> outputs [E, B, C]`` and parameters, from the same E experts."""
    torch.manual_seed(0)
    bank = MnistExpertBank.create(num_experts)
    modules = bank.to_modules()
    singles = [MnistExpertBank.from_modules([m]) for m in bank.to_modules()]
    return {
        "loop": (lambda x: torch.stack([m(x)[0] for m in modules]),
                 [p for m in modules for p in m.parameters()]),
        "loop1": (lambda x: torch.cat([b(x, shared=True)[0] for b in singles]),
                  [p for b in singles for p in b.parameters()]),
        "bank": (lambda x: bank(x, shared=True)[0], list(bank.parameters())),
    }


def bench(num_experts: int, batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per training step, by Adam implementation and side."""
    torch.manual_seed(1)
    x_BCHW = torch.randn(batch, 1, 28, 28)
    labels_B = torch.randint(0, 10, (batch,))
    probs_BE = torch.softmax(torch.randn(batch, num_experts), dim=-1)
    results = {}
    for name, adam_kwargs in ADAM_OPTIONS.items():
        sides = make_sides(num_experts)
        with torch.no_grad():
            ref_EBC = sides["loop"][0](x_BCHW)
            for forward, _ in sides.values():
                torch.testing.assert_close(forward(x_BCHW), ref_EBC, rtol=1e-4, atol=1e-6)
        steps = {}
        for side, (forward, params) in sides.items():
            optimizer = torch.optim.Adam(params, lr=1e-3, **adam_kwargs)

            def step(forward=forward, optimizer=optimizer):
                out_BC = torch.einsum("be,ebc->bc", probs_BE, forward(x_BCHW))
                loss = mixture_nll(out_BC, labels_B)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            steps[side] = step
        for _ in range(2):  # warm-up: allocator, oneDNN primitives, optimizer state
            for step in steps.values():
                step()
        times = {side: [] for side in SIDES}
        for _ in range(repeats):
            for side, step in steps.items():
                start = time.perf_counter()
                step()
                times[side].append(time.perf_counter() - start)
        results[name] = {side: statistics.median(t) * 1e3 for side, t in times.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer experts and repeats")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=0, help="timed steps per side (0: 11, quick: 3)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 11)
    sizes = (5, 20) if args.quick else (5, 20, 40)
    print(f"MNIST experts, batch {args.batch}, dense shared input, forward + backward + Adam step; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} steps")
    print(f"{'E':>3}  {'Adam':<9} {'loop ms':>8} {'loop1 ms':>9} {'bank ms':>8} "
          f"{'loop/bank':>10} {'loop1/bank':>11}")
    for E in sizes:
        results = bench(E, args.batch, repeats)
        best = {side: min(results, key=lambda name: results[name][side]) for side in SIDES}
        rows = list(results.items()) + [("best", {side: results[best[side]][side] for side in SIDES})]
        for name, ms in rows:
            print(f"{E:>3}  {name:<9} {ms['loop']:8.1f} {ms['loop1']:9.1f} {ms['bank']:8.1f} "
                  f"{ms['loop'] / ms['bank']:9.2f}x {ms['loop1'] / ms['bank']:10.2f}x", flush=True)
        print(f"     (best Adam: " + ", ".join(f"{side} {best[side]}" for side in SIDES) + ")")


if __name__ == "__main__":
    main()
