"""The figures of ``moe-dist study experts`` (docs/papers.md A.10, the paper's figures 6-7 extended
to many experts and seeds), drawn from study.csv's rows and the runs' selection tables:

* ``study_usage.png``: experts used and H_u vs E, one line per regulariser, error bars the
  sample std over seeds; the ceilings y = E and log2 E dashed, the number of classes dotted
  (the paper's claim: L_s plateaus near it, L_cv follows E).
* ``study_error.png``: test error vs E. ``study_cost.png``: step time and peak memory vs E
  (and bytes sent per step under expert parallelism, where measured).
* ``study_selection.png``: selection tables (experts x true class, the first finished seed)
  at chosen E and regularisers. Each column is normalised to the class's test samples, and
  the experts are sorted by their most frequent class so that the partition shows at E = 160.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.colors import PowerNorm
from matplotlib.ticker import LogFormatter, ScalarFormatter

from moe_dist.plots import class_names  # also selects the headless Agg backend

#: The figures, in the order write_study_figures returns them.
FIGURE_NAMES = ("study_usage.png", "study_error.png", "study_cost.png", "study_selection.png")
#: Above this many experts a heatmap has no per-expert tick labels (they would overlap).
MAX_EXPERT_LABELS = 20


def write_study_figures(rows: list[dict[str, Any]], runs: dict[tuple[str, int], list[Any]], root: Path,
                        heatmap_experts: Sequence[int], heatmap_regularizers: Sequence[str]) -> list[Path]:
    """Write the four figures under ``root``; returns their paths."""
    classes = next((len(run.metrics["selection_table"][0]) for point in runs.values() for run in point
                    if run.metrics.get("selection_table")), None)
    paths = [root / name for name in FIGURE_NAMES]
    usage_figure(rows, classes, paths[0])
    panels = [("test_error", "test error")]
    _save(_vs_experts(rows, panels, "Test error vs number of experts (mean ± std over seeds)"), paths[1])
    panels = [("step_seconds", "step time (s)"), ("peak_memory_mb", "peak memory (MB)")]
    if any(r.get("comm_bytes_per_step_mean") is not None for r in rows):
        panels.append(("comm_bytes_per_step", "bytes sent per step"))
    stacked = max((r["stack_members_mean"] for r in rows), default=1)
    note = f"; stacked runs (up to {stacked:g}): the whole stack's" if stacked > 1 else ""
    _save(_vs_experts(rows, panels, f"Cost vs number of experts (mean ± std over seeds{note})", log_y=True), paths[2])
    selection_figure(runs, heatmap_experts, heatmap_regularizers, paths[3])
    return paths


class _PlainLogFormatter(LogFormatter):
    """Log-axis labels as plain numbers (120, 0.3), not 1.2 x 10^2: costs are read off, not compared in decades."""

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _experts_axis(ax: Any, experts: Sequence[int]) -> None:
    """Log-x in E, ticks at the study's E values (5, 10, ..., 160) and nowhere else."""
    ax.set_xscale("log")
    ax.set_xticks(list(experts))
    ax.set_xticklabels([str(E) for E in experts])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("experts E")
    ax.grid(alpha=0.3)


def _plot_lines(ax: Any, rows: list[dict[str, Any]], key: str) -> None:
    """One line per regulariser: the mean over seeds with the sample std as error bars."""
    for regularizer in dict.fromkeys(r["regularizer"] for r in rows):
        points = sorted((r["E"], r[f"{key}_mean"], r[f"{key}_std"] or 0.0) for r in rows
                        if r["regularizer"] == regularizer and r.get(f"{key}_mean") is not None)
        if points:
            E, mean, std = zip(*points)
            ax.errorbar(E, mean, yerr=std, marker="o", markersize=4, capsize=3, label=regularizer)


def _vs_experts(rows: list[dict[str, Any]], panels: list[tuple[str, str]], title: str, log_y: bool = False) -> Any:
    """One panel per (key, label), the key's mean ± std against E per regulariser (log-log
    with ``log_y``: a cost proportional to E is then a line of slope 1)."""
    experts = sorted({r["E"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        _plot_lines(ax, rows, key)
        _experts_axis(ax, experts)
        ax.set_ylabel(label)
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def usage_figure(rows: list[dict[str, Any]], classes: int | None, path: Path) -> None:
    """Experts used and 2^H_u (log-log: y = E is the diagonal) and H_u against E, with their ceilings."""
    experts = sorted({r["E"] for r in rows})
    fig, (used, effective, entropy) = plt.subplots(1, 3, figsize=(15.6, 4.2))
    for ax, key, label in ((used, "experts_used", "experts used (> 1 % of test samples)"),
                           (effective, "effective_experts", "effective experts 2^H_u")):
        _plot_lines(ax, rows, key)
        ax.plot(experts, experts, linestyle="--", color="grey", linewidth=1, label="all experts (y = E)")
        if classes:
            ax.axhline(classes, linestyle=":", color="black", linewidth=1, label=f"classes ({classes})")
        ax.set_yscale("log")
        ax.set_yticks(sorted({*experts, *([classes] if classes else [])}))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_yticks([], minor=True)
        ax.set_ylabel(label)
    _plot_lines(entropy, rows, "usage_entropy")
    entropy.plot(experts, [math.log2(E) for E in experts], linestyle="--", color="grey", linewidth=1,
                 label="log2 E (ceiling)")
    if classes:
        entropy.axhline(math.log2(classes), linestyle=":", color="black", linewidth=1,
                        label=f"log2 classes ({math.log2(classes):.2f})")
    entropy.set_ylabel("H_u (bits)")
    for ax in (used, effective, entropy):
        _experts_axis(ax, experts)
        ax.legend(fontsize=8)
    fig.suptitle("Experts used and usage entropy vs number of experts (mean ± std over seeds)", fontsize=10)
    _save(fig, path)


def sort_by_class(table_EC: Any) -> tuple[Any, Any]:
    """(order, shares): the experts ordered by their most frequent class (most samples first
    within a class, unused experts last), and each class's share of its test samples per expert."""
    import numpy as np

    table = np.asarray(table_EC, dtype=float)
    shares = table / np.maximum(table.sum(axis=0, keepdims=True), 1.0)
    top = np.where(table.sum(axis=1) > 0, table.argmax(axis=1), table.shape[1])
    order = np.lexsort((-table.max(axis=1), top))
    return order, shares[order]


def _heatmap(ax: Any, run: Any, title: str) -> Any:
    """One selection table, experts sorted by class; per-expert labels only up to MAX_EXPERT_LABELS."""
    order, shares = sort_by_class(run.metrics["selection_table"])
    num_experts, num_classes = shares.shape
    # A square-root colour scale: at E = 160 with L_cv a class spreads over ~16 experts, and
    # shares of a few percent must still show against the unused experts' zero.
    image = ax.imshow(shares, cmap="viridis", aspect="auto", interpolation="nearest",
                      norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0))
    names = class_names(run.config.get("data", {}).get("name"), num_classes) or [str(c) for c in range(num_classes)]
    ax.set_xticks(range(num_classes))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
    if num_experts <= MAX_EXPERT_LABELS:
        ax.set_yticks(range(num_experts))
        ax.set_yticklabels([str(e) for e in order], fontsize=6)
        ax.set_ylabel("top-gated expert (id)", fontsize=8)
    else:
        ax.set_ylabel(f"top-gated expert, sorted position (of {num_experts})", fontsize=8)
    ax.set_title(f"{title}, seed {run.seed}\nexperts sorted by most frequent class", fontsize=8)
    return image


def selection_figure(runs: dict[tuple[str, int], list[Any]], experts: Sequence[int], regularizers: Sequence[str],
                     path: Path) -> None:
    """Heatmaps: one row per regulariser, one column per E (the first finished seed of each)."""
    rows, cols = max(len(regularizers), 1), max(len(experts), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.0, 3.8 * rows), squeeze=False, layout="constrained")
    image = None
    for i, regularizer in enumerate(regularizers):
        for j, E in enumerate(experts):
            ax, point = axes[i][j], runs.get((regularizer, E), [])
            run = next((r for r in point if r.metrics.get("selection_table")), None)
            if run is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{regularizer}, E = {E}:\nno finished run", ha="center", va="center")
                continue
            image = _heatmap(ax, run, f"{regularizer}, E = {E}")
    if image is not None:
        fig.colorbar(image, ax=axes, fraction=0.03, label="share of the class's test samples")
    fig.suptitle("Expert selection (test set): which expert takes which class", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
