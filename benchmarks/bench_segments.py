"""Benchmark the segment sums of expert-parallel top-k dispatch: native kernels against PyTorch.

One rank's four segment sums of one ``bench_dispatch.py`` step (E = 8 experts on 2 ranks,
top-2, 4,096 tokens per rank, hidden 256), forward and backward, as
``moe_dist.parallel.dispatch`` runs them:

* ``combine``: the weighted outputs of the local pairs summed per received unit
  (``weighted_segment_sum``; backward: the outputs' and the gate weights' gradients);
* ``by sample``: the returned units summed per sample (``segment_sum``; backward: a gather);
* ``pairs' gradients``: the local pairs' gradients summed per unit (``_SendRows``' backward);
* ``units' gradients``: the returned gradients summed per sample (same, on the sender).

The routing is drawn as in that benchmark (uniform top-2 over 8 experts, 4 per rank), so the
sizes are its sizes (about 8,200 pairs, 6,450 units, 4,096 samples). Each is timed with the
native kernels (``MOE_DIST_NATIVE=1``) and with the PyTorch path (``=0``, what dispatch ran
before), interleaved, median of ``--steps``; printed: milliseconds and native / PyTorch. The
segments' layout that only the native path needs (one stable sort per segment set, built once
per step and shared by two sums each) is timed apart ("layout") and counted in its total.

Run: ``python benchmarks/bench_segments.py`` (a few seconds); ``--threads`` (default 1, as one
rank of bench_dispatch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import moe_dist  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_dist.parallel.segments import Segments, segment_sum, weighted_segment_sum

TOKENS, HIDDEN, E, K, RANKS = 4096, 256, 8, 2, 2


def routing(seed: int = 0):
    """What rank 0 computes and sends in one step: the units it receives and their pairs
    (pair -> unit, pair -> weight entry), and the units it sends (unit -> sample)."""
    g = torch.Generator().manual_seed(seed)
    local = E // RANKS
    index_BK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(TOKENS * RANKS)])
    owner_BK = index_BK // local
    # received by rank 0: every sample (of both ranks) with a chosen expert on rank 0
    has_BK = owner_BK == 0
    units = has_BK.any(1).nonzero().squeeze(1)
    unit_of_sample = torch.full((TOKENS * RANKS,), -1).index_copy_(0, units, torch.arange(units.numel()))
    pair_B, pair_K = has_BK.nonzero().unbind(1)
    unit_Q = unit_of_sample[pair_B]
    entry_Q = unit_Q * K + pair_K
    # sent by rank 0: its own samples, one unit per destination rank holding a chosen expert
    mine = owner_BK[:TOKENS]
    dest = torch.stack([(mine == r).any(1) for r in range(RANKS)], 1)
    sample_U = dest.t().nonzero()[:, 1]  # grouped by destination, as dispatch sends them
    return unit_Q, entry_Q, units.numel(), sample_U


def steps(args) -> dict[str, list[float]]:
    unit_Q, entry_Q, num_units, sample_U = routing()
    g = torch.Generator().manual_seed(1)
    out_QC = torch.randn(unit_Q.numel(), HIDDEN, generator=g)
    w_F = torch.rand(num_units * K, generator=g)
    back_UC = torch.randn(sample_U.numel(), HIDDEN, generator=g)
    cot_units = torch.randn(num_units, HIDDEN, generator=g)
    cot_samples = torch.randn(TOKENS, HIDDEN, generator=g)

    by_unit, by_sample = Segments(unit_Q, num_units), Segments(sample_U, TOKENS)

    def layout():  # what the native path adds once per step (dispatch caches it on the route)
        Segments(unit_Q, num_units).csr, Segments(sample_U, TOKENS).csr

    out_leaf, w_leaf, back_leaf = (t.clone().requires_grad_(True) for t in (out_QC, w_F, back_UC))

    def combine():
        out_leaf.grad = w_leaf.grad = None
        weighted_segment_sum(out_leaf, w_leaf, entry_Q, by_unit).backward(cot_units)

    def per_sample():
        back_leaf.grad = None
        segment_sum(back_leaf, by_sample).backward(cot_samples)

    cases = {"combine": combine, "by sample": per_sample,
             "pairs' gradients": lambda: segment_sum(out_QC, by_unit),
             "units' gradients": lambda: segment_sum(back_UC, by_sample)}
    times: dict[str, list[float]] = {f"{n}|{p}": [] for n in cases for p in ("native", "pytorch")}
    times["layout|native"] = []
    for step in range(args.warmup + args.steps):
        for name, fn in [*cases.items(), ("layout", layout)]:
            for path, flag in (("native", "1"), ("pytorch", "0")):
                if name == "layout" and path == "pytorch":
                    continue
                os.environ["MOE_DIST_NATIVE"] = flag
                start = time.perf_counter()
                fn()
                if step >= args.warmup:
                    times[f"{name}|{path}"].append(time.perf_counter() - start)
    os.environ.pop("MOE_DIST_NATIVE")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from moe_dist.models import native

    if native.library() is None:
        sys.exit("the native kernels are not built here (no C++ compiler, or MOE_DIST_NATIVE=0)")
    times = steps(args)
    print(f"segment sums of one bench_dispatch step on one rank, forward + backward, {args.threads} thread(s), "
          f"median of {args.steps}; load {os.getloadavg()[0]:.2f}")
    print(f"{'':18s} {'native ms':>10s} {'PyTorch ms':>11s} {'ratio':>7s}")
    ms = {key: 1000 * statistics.median(v) for key, v in times.items()}
    for name in dict.fromkeys(key.split("|")[0] for key in times if key != "layout|native"):
        native_ms, pytorch_ms = ms[f"{name}|native"], ms[f"{name}|pytorch"]
        print(f"{name:18s} {native_ms:10.2f} {pytorch_ms:11.2f} {native_ms / pytorch_ms:7.3f}")
    print(f"{'layout':18s} {ms['layout|native']:10.2f} {'-':>11s}   (two stable sorts, once per step)")
    native_total = sum(v for key, v in ms.items() if key.endswith("|native"))
    pytorch_total = sum(v for key, v in ms.items() if key.endswith("|pytorch"))
    print(f"{'in all':18s} {native_total:10.2f} {pytorch_total:11.2f} {native_total / pytorch_total:7.3f}")


if __name__ == "__main__":
    main()
