"""Figures shared by TensorBoard logging and the reports (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def class_names(data: str | None, columns: int) -> list[str] | None:
    """The class names of dataset ``data`` (``data.name``) where they are fixed and number
    ``columns``: the tick labels of a selection table's class axis; None otherwise."""
    if data == "synthetic":
        names = ["-1", "+1"]
    elif data in ("mnist", "mnist10k", "fashion_mnist", "fmnist_mnist"):
        from moe_dist.data.combined import CLASS_NAMES
        from moe_dist.data.idx import FASHION_MNIST, MNIST

        names = {"fashion_mnist": list(FASHION_MNIST.class_names),
                 "fmnist_mnist": list(CLASS_NAMES)}.get(data, list(MNIST.class_names))
    else:
        return None
    return names if len(names) == columns else None


def selection_heatmap(table_EC, class_names: list[str] | None = None, title: str = "expert selection"):
    """Expert x class count table as a heatmap (paper figures 2, 3): which expert takes which class."""
    table = np.asarray(table_EC, dtype=float)
    num_experts, num_classes = table.shape
    fig, ax = plt.subplots(figsize=(0.55 * num_classes + 2.0, 0.4 * num_experts + 1.6))
    im = ax.imshow(table, cmap="viridis", aspect="auto")
    ax.set_xticks(range(num_classes))
    ax.set_xticklabels(class_names or [str(c) for c in range(num_classes)], rotation=60, fontsize=7)
    ax.set_yticks(range(num_experts))
    ax.set_yticklabels([f"E{e}" for e in range(num_experts)], fontsize=7)
    ax.set_xlabel("true class")
    ax.set_ylabel("top-gated expert")
    ax.set_title(title, fontsize=9)
    if num_experts * num_classes <= 400:
        peak = table.max() or 1.0
        for e in range(num_experts):
            for c in range(num_classes):
                value = table[e, c]
                if value:
                    ax.text(c, e, f"{value:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if value > 0.6 * peak else "white")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig
