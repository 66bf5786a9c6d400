"""Exact evaluation of a model over a whole split (never a last batch): docs/papers.md A.7.

``evaluate`` needs a model (or an engine) and batches, nothing of a Trainer, so procedures
that only evaluate (``moe-dist eval``, distillation's top-k evaluation) call it directly.
With several ranks each evaluates its share of every batch and the counts are summed once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch

from moe_dist.losses import model_loss
from moe_dist.metrics import EvalAccumulator
from moe_dist.parallel import all_reduce, is_distributed

__all__ = ["GROUP_KEYS", "batch_share", "evaluate", "global_batch_size"]


def global_batch_size(batches: Any, index: int) -> int | None:
    """Size of global batch ``index`` when this rank holds a share of it, else None (the
    local batch is the global one). Works for TensorBatches and shard batches alike."""
    if not is_distributed():
        return None
    return min(batches.batch_size, len(batches.split) - index * batches.batch_size)


def batch_share(batches: Any, index: int) -> tuple[int, int]:
    """(size of global batch ``index``, position of this rank's first sample in it): the
    contiguous split of TensorBatches and shard batches, sizes differing by at most one,
    earlier ranks larger. One process: (the batch's size, 0)."""
    total = min(batches.batch_size, len(batches.split) - index * batches.batch_size)
    base, extra = divmod(total, batches.world_size)
    return total, batches.rank * base + min(batches.rank, extra)


#: Hierarchical routing: the group-level metrics, named after the expert-level ones they mirror.
GROUP_KEYS = {"mutual_information": "group_mutual_information", "sample_entropy": "group_sample_entropy",
              "usage_entropy": "group_usage_entropy", "selection_table": "group_selection_table",
              "soft_selection_table": "group_soft_selection_table", "samples_per_expert": "samples_per_group",
              "experts_used": "groups_used"}


def evaluate(model: Any, batches: Any, num_classes: int, *, num_experts: int = 0, num_clusters: int = 0,
             num_groups: int = 0, loss_kind: str = "auto",
             autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, Any]:
    """Metrics of ``model`` (a module or an Engine) over every batch of ``batches`` (a
    TensorBatches or shard batches; with several ranks, this rank's shares).

    ``num_experts`` = 0 for a single model; ``num_clusters`` > 0 counts dispatch per cluster
    (synthetic data, docs/papers.md B.4); ``num_groups`` > 0 (hierarchical routing) adds the
    same metrics for the groups (p(g), the top chosen group) under ``GROUP_KEYS``. ``loss`` is the training objective (task loss plus the
    gate losses). Runs on a forked RNG, so evaluating (which may draw routing noise) never
    changes the training run's random stream: a run evaluated every epoch trains exactly
    like one evaluated once."""
    device = model.device if hasattr(model, "device") else next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.train(False)
        acc = EvalAccumulator(num_experts, num_classes, num_clusters)
        groups = EvalAccumulator(num_groups, num_classes) if num_groups else None
        for index, (x, y_B, idx_B) in enumerate(batches.batches(0)):
            global_batch = global_batch_size(batches, index)
            with autocast():
                out = model(x)
                loss, _ = model_loss(out, y_B, loss_kind, global_batch)
            _add_batch(acc, out, y_B, batches.split.cluster[idx_B] if num_clusters else None,
                       float(loss) * (global_batch or len(y_B)))
            if groups is not None:
                groups.update(y_B, out.output.float(), out.group_probs, out.group_index[:, 0])
        accumulators = [acc] if groups is None else [acc, groups]
        for t in (t for a in accumulators for t in a.state_tensors()):  # exact: summed over ranks, once
            all_reduce(t)
        result = acc.compute()
        if groups is not None:
            result.update({name: value for key, value in groups.compute().items()
                           if (name := GROUP_KEYS.get(key))})
        return result


def _add_batch(acc: EvalAccumulator, out: Any, y_B: torch.Tensor, clusters_B: torch.Tensor | None,
               loss_sum: float) -> None:
    routed = out.expert_index is not None  # a single model routes nothing: no cluster counts
    top_pred = out.top_expert_output.argmax(1) if out.top_expert_output is not None else None
    acc.update(y_B, out.output.float(), out.gate_probs, out.expert_index[:, 0] if routed else None,
               top_pred, clusters_B if routed else None, loss_sum)
