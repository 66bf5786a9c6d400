"""The cost model of docs/results/scaleout/README.md, fitted to ``bench_scaleout.py``'s table.

Per training step of the Fashion-MNIST vanilla MoE (dense routing: every expert sees every
sample of its expert-parallel group) on N processes, ep_size P (N / P data-parallel replicas
of each expert block), b samples per process, L = ceil(E / P) experts on the busiest process
and G = P * b rows gathered in the EP group:

* compute = t0 + a * b + c * L * G: the gate and the loss on the local rows (a), the local
  experts on the gathered rows (c; L * G = E * b when P divides E: dense routing gives every
  process the same expert work at any P). Fitted by least squares to the one-process rows.
* communication = n * alpha + bytes / link bandwidth: n collectives per step of latency
  alpha each, bytes from :func:`bytes_per_rank` (the formulas that
  ``moe_dist.parallel.traffic`` counts, checked against its counts here).
* On this CPU the two processes of ep_size 2 share the cores with each other and the
  background load: step = s x compute + n * alpha + bytes / bandwidth, with the slowdown s
  and alpha fitted to the two-process rows and the bandwidth measured by the benchmark.
* memory per process = m0 + 16 bytes x local parameters (weights, gradients, Adam's two
  moments) + 2 x G x D x 4 bytes (gathered images and their send buffer, ep_size > 1)
  + k * L * G + g * b (activations), m0, k and g fitted to every row.

``python benchmarks/scaleout_model.py docs/results/scaleout/cpu.json`` prints the fit, the
prediction next to every measured row, and the GPU extrapolation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np

from moe_dist.tables import markdown_table

D, C = 28 * 28, 10  # input features (the gathered images), expert outputs
F32 = 4
F64 = 8
KINDS = ("dispatch", "gradients", "other")

# Issue 12's H200 measurements of one Fashion-MNIST vanilla run (fp32, moe_dist as of then):
# (E, batch) -> ms per step. The step is bound by per-operation overhead below ~12 ms.
H200_MS = {(5, 512): 5.7, (50, 512): 5.7, (5, 5120): 2.2 * 5.7, (50, 5120): 3.0 * 5.7}
H100_PEAK_MB = 379.3  # docs/results/fmnist_gpu/vanilla: max_memory_allocated, E = 5, batch 512
NVLINK = 450e9  # bytes/s per direction per H100/H200 GPU (NVLink 4: 18 links x 25 GB/s)
INFINIBAND = 50e9  # bytes/s per GPU: one NDR 400 Gb/s ConnectX-7 port per GPU
GPUS_PER_NODE = 8
# Latency per collective: assumed (neither measured here nor a vendor figure), to show its size.
ALPHA_NODE, ALPHA_CLUSTER = 20e-6, 50e-6


def model_sizes(num_experts: int) -> dict:
    """Parameter counts of the Fashion-MNIST MoE: per expert, the replicated part, its tensor
    count (one presence flag each in the gradient all-reduce) and the gate's BatchNorm channels."""
    import torch

    from moe_dist.config import LossConfig, ModelConfig, MoEConfig
    from moe_dist.models import build_model

    with torch.device("meta"):
        model = build_model(ModelConfig(arch="fmnist"), MoEConfig(num_experts=num_experts), LossConfig(), 10,
                            (1, 28, 28))
    experts = [p for n, p in model.named_parameters() if n.startswith("experts.")]
    replicated = [p for n, p in model.named_parameters() if not n.startswith("experts.")]
    bn = [m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # conv + BatchNorm blocks (the gate's), which the native CPU kernels run: (channels, columns)
    blocks = [(m.bn.num_features, m.conv.in_channels * math.prod(m.conv.kernel_size)) for m in model.modules()
              if isinstance(getattr(m, "bn", None), torch.nn.BatchNorm2d)
              and isinstance(getattr(m, "conv", None), torch.nn.Conv2d)]
    return {"per_expert": sum(p.numel() for p in experts) // num_experts, "expert_tensors": len(experts),
            "replicated": sum(p.numel() for p in replicated), "replicated_tensors": len(replicated),
            "bn_channels": bn, "bn_blocks": blocks}


def nonnegative_fit(X: list[list[float]], y: list[float]) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a negative time or memory per unit of work
    is not physical; with noisy timings plain least squares gives some): the best fit over
    the subsets of regressors whose own fit is non-negative (few regressors: exhaustive)."""
    X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    best, best_err = np.zeros(X.shape[1]), float(np.sum(y ** 2))
    for mask in itertools.product((False, True), repeat=X.shape[1]):
        cols = [i for i, keep in enumerate(mask) if keep]
        if not cols:
            continue
        coef = np.linalg.lstsq(X[:, cols], y, rcond=None)[0]
        err = float(np.sum((X[:, cols] @ coef - y) ** 2))
        if (coef >= 0).all() and err < best_err:
            best, best_err = np.zeros(X.shape[1]), err
            best[cols] = coef
    return best


def ring(n: int, nbytes: float) -> float:
    return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def bytes_per_rank(E: int, P: int, N: int, b: int, sizes: dict, L: int | None = None,
                   native: bool = False) -> dict[str, float]:
    """Bytes the process holding L experts (default ceil(E / P)) sends per training step.

    dispatch: its b images to the P - 1 others (all-gather), its L experts' outputs for their
    (P - 1) b samples (all-to-all), and in the backward the gradients of the E - L outputs it
    received (the images need none). gradients: ring all-reduces of the replicated part over
    N and of the expert block over its N / P copies. other: the global BatchNorm statistics,
    forward an all-gather made of an all-reduce of N x 3 x channels numbers (count, mean,
    squared deviations); backward, PyTorch's path all-reduces as many floats again, the native
    CPU gate block (``native``) two sums per channel and one per column, all in double."""
    L = math.ceil(E / P) if L is None else L
    dispatch = (P - 1) * b * D * F32 + (L * (P - 1) * b + b * (E - L)) * C * F32 if P > 1 else 0.0
    R = N // P
    grads = ring(N, F32 * (sizes["replicated"] + sizes["replicated_tensors"]))
    grads += ring(R, F32 * (L * sizes["per_expert"] + sizes["expert_tensors"]))
    if native:
        other = sum(ring(N, N * 3 * ch * F64) + ring(N, (2 * ch + cols) * F64) for ch, cols in sizes["bn_blocks"])
    else:
        other = sum(2 * ring(N, N * 3 * ch * F32) for ch in sizes["bn_channels"])
    return {"dispatch": dispatch, "gradients": grads, "other": other}


def collectives(E: int, P: int, N: int, sizes: dict, trainer: bool = False) -> int:
    """Collectives per training step: the batch layout, the gate's BatchNorm forward and
    backward, one gradient all-reduce per 25 MB bucket and group, with ep_size > 1 the
    all-gather and the all-to-all forward and backward; the trainer adds the loss values and
    the preemption flag."""
    L = math.ceil(E / P)
    bucket = 25 * 2**20
    n = 3 + math.ceil(F32 * sizes["replicated"] / bucket)
    if P > 1:
        n += 3 + (math.ceil(F32 * L * sizes["per_expert"] / bucket) if N > P else 0)
    else:
        n += math.ceil(F32 * E * sizes["per_expert"] / bucket) - 1  # one flat list with the gate
    return n + 2 * trainer


def features(E: int, P: int, b: int) -> list[float]:
    """The compute model's regressors for the busiest process: 1, b, L * G."""
    L = math.ceil(E / P)
    return [1.0, b, L * P * b]


def fit_compute(rows: list[dict]) -> np.ndarray:
    """(t0, a, c) in seconds from the one-process rows."""
    ones = [r for r in rows if r["ep_size"] == 1]
    return nonnegative_fit([features(r["experts"], 1, r["batch"]) for r in ones], [r["step_seconds"] for r in ones])


def memory_regressors(E: int, P: int, b: int, sizes: dict) -> tuple[float, list[float]]:
    """(the known part in MB, [1, L * G, b]) for the busiest process. Known: 16 bytes per
    local parameter and, with ep_size > 1, the gathered images (G x D floats) and their
    padded send buffer. Runs at P <= 2 cannot tell memory per gathered row from memory per
    local row (G = b or 2 b), so the gathered rows' own memory is counted, not fitted."""
    L = math.ceil(E / P)
    params = sizes["replicated"] + L * sizes["per_expert"]
    gathered = 2 * P * b * D * F32 if P > 1 else 0
    return (16 * params + gathered) / 2**20, [1.0, L * P * b, b]


def fit_memory(rows: list[dict], sizes_of) -> np.ndarray:
    """(m0, k per expert-row, g per local row) in MB from every row's largest RSS growth."""
    X, y = [], []
    for r in rows:
        known, regs = memory_regressors(r["experts"], r["ep_size"], r["batch"] // r["ep_size"],
                                        sizes_of(r["experts"]))
        X.append(regs)
        y.append(max(r["rss_delta_mb"]) - known)
    return nonnegative_fit(X, y)


def fit_sharing(rows: list[dict], compute: np.ndarray, sizes_of) -> tuple[float, float]:
    """(s, alpha seconds) of the two-process rows: step - bytes / bandwidth = s x compute +
    n x alpha, least squares (non-negative)."""
    X, y = [], []
    for r in rows:
        E, P, B = r["experts"], r["ep_size"], r["batch"]
        if P == 1:
            continue
        sizes = sizes_of(E)
        wire = sum(bytes_per_rank(E, P, P, B // P, sizes, native=r.get("native", False)).values())
        wire /= r["link_bytes_per_second"]
        X.append([float(np.dot(compute, features(E, P, B // P))), collectives(E, P, P, sizes)])
        y.append(r["step_seconds"] - wire)
    s, alpha = nonnegative_fit(X, y)
    return float(s), float(alpha)


def check_cpu(rows: list[dict], compute: np.ndarray, sharing: tuple[float, float], memory: np.ndarray,
              sizes_of) -> str:
    """Every measured row next to the model's prediction (time, memory, bytes), Markdown."""
    s, alpha = sharing
    headers = ("E", "batch", "ep", "measured ms", "compute ms", "wire ms", "n", "model ms", "measured / model",
               "model + act MB", "model MB", "bytes sent MB", "formula MB")
    lines = []
    for r in rows:
        E, P, B = r["experts"], r["ep_size"], r["batch"]
        b, sizes = B // P, sizes_of(E)
        sent = max(sum(k.values()) for k in r["bytes_per_step"])
        formula = sum(bytes_per_rank(E, P, P, b, sizes, native=r.get("native", False)).values()) if P > 1 else 0.0
        wire = formula / r["link_bytes_per_second"] if P > 1 else 0.0
        compute_s = float(np.dot(compute, features(E, P, b)))
        n = collectives(E, P, P, sizes) if P > 1 else 0
        t = (s * compute_s + n * alpha + wire) if P > 1 else compute_s
        known, regs = memory_regressors(E, P, b, sizes)
        lines.append((E, B, P, f"{1000 * r['step_seconds']:.1f}", f"{1000 * compute_s:.1f}", f"{1000 * wire:.2f}", n,
                      f"{1000 * t:.1f}", f"{r['step_seconds'] / t:.2f}", f"{max(r['rss_delta_mb']):.0f}",
                      f"{known + float(np.dot(memory, regs)):.0f}", f"{sent / 2**20:.3f}", f"{formula / 2**20:.3f}"))
    return markdown_table(headers, lines, align=["right"] * len(headers))


def fit_gpu() -> tuple[float, float, float]:
    """(floor ms, a ms per row, c ms per expert-row): step = max(floor, a b + c E b), exact
    through issue 12's four H200 points (the floor is the E = 5, batch 512 time)."""
    (E1, B1), (E2, B2) = (5, 5120), (50, 5120)
    c = (H200_MS[(E2, B2)] - H200_MS[(E1, B1)]) / (E2 * B2 - E1 * B1)
    a = (H200_MS[(E1, B1)] - c * E1 * B1) / B1
    return H200_MS[(5, 512)], a, c


def choose_ep(E: int, N: int) -> int:
    """ep_size = N where E allows, else the largest divisor of N that is at most E."""
    return max(p for p in range(1, N + 1) if N % p == 0 and p <= E)


def gpu_row(E: int, N: int, P: int, b: int, gpu: tuple, memory: np.ndarray) -> dict:
    floor, a, c = gpu
    sizes = model_sizes(E)
    L = math.ceil(E / P)
    compute = max(floor, a * b + c * L * P * b) / 1000
    sent = bytes_per_rank(E, P, N, b, sizes)
    # off-node share: the EP group's peers beyond this node; the gradient rings cross nodes
    # once N > 8 (all of it at the slower rate: an upper bound)
    ep_off = max(P - GPUS_PER_NODE, 0) / (P - 1) if P > 1 else 0.0
    slow = sent["dispatch"] * ep_off + (sent["gradients"] + sent["other"] if N > GPUS_PER_NODE else 0.0)
    fast = sum(sent.values()) - slow
    n = collectives(E, P, N, sizes, trainer=True)
    latency = n * (ALPHA_NODE if N <= GPUS_PER_NODE else ALPHA_CLUSTER)
    comm = latency + fast / NVLINK + slow / INFINIBAND
    known, regs = memory_regressors(E, P, b, sizes)
    known5, regs5 = memory_regressors(5, 1, 512, model_sizes(5))
    mem = H100_PEAK_MB + known - known5 + float(np.dot(memory[1:], np.array(regs[1:]) - np.array(regs5[1:])))
    return {"gpus": N, "experts": E, "ep_size": P, "dp": N // P, "batch_per_gpu": b, "local_experts": L,
            "compute_ms": 1000 * compute, "bytes_per_gpu": sent, "collectives": n, "latency_ms": 1000 * latency,
            "comm_ms": 1000 * comm, "step_ms": 1000 * (compute + comm), "samples_per_s": N * b / (compute + comm),
            "memory_mb": mem}


def gpu_table(memory: np.ndarray, b: int = 512) -> tuple[str, list[dict]]:
    gpu = fit_gpu()
    rows = []
    for E in (160, 1024):
        for N in (8, 64, 512):
            rows.append(gpu_row(E, N, choose_ep(E, N), b, gpu, memory))
            rows.append(gpu_row(E, N, 1, b, gpu, memory))  # data parallel only, for comparison
    title = (f"H200 compute = max({gpu[0]:.1f} ms, {gpu[1] * 1000:.3f} us x b + {gpu[2] * 1e6:.1f} ns x L x G); "
             f"batch {b} per GPU; latency {ALPHA_NODE * 1e6:.0f} us per collective in one node, "
             f"{ALPHA_CLUSTER * 1e6:.0f} us across nodes (assumed)")
    headers = ("GPUs", "E", "ep_size", "dp", "experts per GPU", "compute ms", "dispatch MB", "gradients MB",
               "collectives", "comm ms", "step ms", "samples/s", "memory per GPU MB")
    lines = [(r["gpus"], r["experts"], r["ep_size"], r["dp"], r["local_experts"], f"{r['compute_ms']:.2f}",
              f"{r['bytes_per_gpu']['dispatch'] / 2**20:.1f}", f"{r['bytes_per_gpu']['gradients'] / 2**20:.1f}",
              r["collectives"], f"{r['comm_ms']:.2f}", f"{r['step_ms']:.2f}", f"{round(r['samples_per_s'], 2 - int(math.log10(r['samples_per_s']))):,.0f}",
              f"{r['memory_mb']:,.0f}") for r in rows]
    return title + "\n\n" + markdown_table(headers, lines, align=["right"] * len(headers)), rows


def report(rows: list[dict], pytorch_rows: list[dict] | None = None) -> tuple[str, dict]:
    """The fits and tables of ``rows``; the GPU memory predictions take their per-row
    increments from ``pytorch_rows`` where given (the same benchmark with MOE_DIST_NATIVE=0:
    the PyTorch blocks, which are what CUDA runs, keep the convolution maps the native CPU
    kernels do not)."""
    cache: dict[int, dict] = {}

    def sizes_of(E: int) -> dict:
        return cache.setdefault(E, model_sizes(E))

    compute = fit_compute(rows)
    sharing = fit_sharing(rows, compute, sizes_of)
    memory = fit_memory(rows, sizes_of)
    gpu_memory = fit_memory(pytorch_rows, sizes_of) if pytorch_rows else memory
    gpu_text, gpu_rows = gpu_table(gpu_memory)
    text = "\n".join([
        f"CPU compute fit (one process, 1 thread): t = {1000 * compute[0]:.2f} ms + {1e6 * compute[1]:.2f} us x b "
        f"+ {1e9 * compute[2]:.2f} ns x L x G",
        f"two processes on the shared cores: step = {sharing[0]:.2f} x compute + n x {1000 * sharing[1]:.2f} ms "
        f"+ bytes / measured loopback bandwidth",
        f"memory fit: {memory[0]:.0f} MB + 16 B x local params + {memory[1] * 2**20:.0f} B x L x G "
        f"+ {memory[2] * 2**20:.0f} B x b (+ 2 x 3,136 B x G with ep_size > 1)",
        f"GPU memory increments (the PyTorch blocks' fit): {gpu_memory[1] * 2**20:.0f} B x L x G "
        f"+ {gpu_memory[2] * 2**20:.0f} B x b" if pytorch_rows else "GPU memory increments: the fit above",
        check_cpu(rows, compute, sharing, memory, sizes_of), "", gpu_text])
    return text, {"compute_fit_s": compute.tolist(), "sharing_fit": {"slowdown": sharing[0], "alpha_s": sharing[1]},
                  "memory_fit_mb": memory.tolist(), "gpu_memory_fit_mb": gpu_memory.tolist(), "gpu": gpu_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("table", help="bench_scaleout.py --json output")
    parser.add_argument("--pytorch", default="", help="the same benchmark with MOE_DIST_NATIVE=0: its memory "
                        "fit gives the GPU predictions' memory (CUDA runs the PyTorch blocks)")
    parser.add_argument("--json", default="", help="also write the fits and GPU predictions here")
    args = parser.parse_args()
    pytorch = json.loads(Path(args.pytorch).read_text())["rows"] if args.pytorch else None
    text, numbers = report(json.loads(Path(args.table).read_text())["rows"], pytorch)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
