"""An epoch's running sums and counts, resumable from a mid-epoch checkpoint.

Loss parts are global values (every rank holds the same sums); counts are this rank's and
are summed over the ranks once, at the end of the epoch. A preempted epoch stores the sums
and the counts summed over ranks in ``TrainState.partial``; on resumption rank 0 alone
restores the counts, so the epoch-end sum stays exact at any number of processes.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_dist.metrics import dispatch_entropy
from moe_dist.parallel import all_reduce

__all__ = ["EpochTally"]

# MoEOutput.routing_stats; the remote rows exist under expert parallelism only, and
# "ep_steps" counts the steps that reported them
ROUTING_KEYS = ("routed", "dropped", "expert_rows", "padded_rows", "remote_rows_sent", "min_remote_rows", "ep_steps")


class EpochTally:
    """Sums over an epoch's steps; :meth:`record` is the epoch's history record."""

    def __init__(self, num_clusters: int, num_experts: int, device: torch.device,
                 partial: dict[str, Any] | None = None, restore_counts: bool = True) -> None:
        partial = partial or {}
        counts = partial.get("counts", {}) if restore_counts else {}
        self.sums: dict[str, float] = dict(partial.get("sums", {}))
        self.num_batches: int = partial.get("num_batches", 0)
        self.correct: int = counts.get("correct", 0)
        self.seen: int = counts.get("seen", 0)
        self.routing = {k: 0 for k in ROUTING_KEYS} | counts.get("routing", {})
        # dispatch counts per (cluster, expert) of the noisy training forward passes (docs/papers.md B.4)
        self.clusters_experts = torch.zeros(num_clusters, max(num_experts, 1), dtype=torch.long, device=device)
        if counts:
            self.clusters_experts += torch.tensor(counts["clusters_experts"], dtype=torch.long,
                                                  device=device).view_as(self.clusters_experts)

    def add(self, values: dict[str, float], out: Any, y_B: torch.Tensor, clusters_B: torch.Tensor | None) -> None:
        """One step: its global loss parts and this rank's counts."""
        for k in self.routing:
            self.routing[k] += out.routing_stats.get(k, 0)
        self.routing["ep_steps"] += int("min_remote_rows" in out.routing_stats)
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.num_batches += 1
        self.correct += int((out.output.argmax(1) == y_B).sum())
        self.seen += len(y_B)
        if clusters_B is not None and out.expert_index is not None:
            self.clusters_experts.index_put_((clusters_B, out.expert_index[:, 0]), torch.ones_like(y_B),
                                             accumulate=True)

    def _summed_counts(self) -> list[int]:
        """[correct, seen, *routing, *clusters_experts] summed over ranks (one all-reduce)."""
        flat = torch.cat([torch.tensor([self.correct, self.seen, *self.routing.values()], dtype=torch.float64),
                          self.clusters_experts.flatten().cpu().double()])
        return [int(v) for v in all_reduce(flat).tolist()]

    def partial(self) -> dict[str, Any]:
        """What a mid-epoch checkpoint keeps (collective: the counts are summed over ranks)."""
        total = self._summed_counts()
        split = 2 + len(self.routing)
        return {"sums": dict(self.sums), "num_batches": self.num_batches,
                "counts": {"correct": total[0], "seen": total[1], "routing": dict(zip(self.routing, total[2:split])),
                           "clusters_experts": total[split:]}}

    def record(self, capacity_factor: float, with_dispatch_entropy: bool) -> dict[str, Any]:
        """The epoch's record (collective): mean batch loss parts, as the paper reports its
        training loss (docs/papers.md A.6), the training error, and the routing statistics."""
        total = self._summed_counts()
        correct, seen = total[0], total[1]
        routing = dict(zip(self.routing, total[2:2 + len(self.routing)]))
        clusters_experts = torch.tensor(total[2 + len(self.routing):]).view_as(self.clusters_experts)
        record: dict[str, Any] = {f"train_{k}": v / max(self.num_batches, 1) for k, v in self.sums.items()}
        if capacity_factor > 0 and routing["routed"]:
            # pairs over capacity, and rows of the padded expert batches that carry no sample
            record["drop_rate"] = routing["dropped"] / routing["routed"]
            record["padding_ratio"] = 1.0 - routing["expert_rows"] / max(routing["padded_rows"], 1)
        if routing["ep_steps"]:  # rows summed over the ranks, per step
            record["remote_rows_per_step"] = routing["remote_rows_sent"] / max(self.num_batches, 1)
            record["min_remote_rows_per_step"] = routing["min_remote_rows"] / max(self.num_batches, 1)
        record["train_error"] = 1.0 - correct / seen if seen else float("nan")
        if with_dispatch_entropy and seen:
            record["dispatch_entropy"] = dispatch_entropy(clusters_experts)
        return record
