"""Specialisation metrics: H_s, H_u, I(E;Y), selection tables, dispatch entropy.

Shape legend (suffixes on tensor names):

    B  samples in a batch
    C  classes
    E  experts
    K  clusters of Chen et al.'s synthetic data

Entropies of Krishnamurthy et al. are in bits (log base 2) with 0 * log 0 = 0
(docs/papers.md A.7); the dispatch entropy of Chen et al. is in nats (B.4). Metric functions
compute in float64 and return Python floats, so results are JSON-serialisable as they are.

:class:`EvalAccumulator` accumulates over the whole evaluation set in one flat float64
buffer that a distributed caller all-reduces once (docs/design.md, choice 7). This fixes the
reference code's H_u, computed from the last test batch only (A.7, FLAG-BUG), and its
error and H_s, averaged over batches with equal weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "entropy_bits",
    "sample_entropy",
    "usage_entropy",
    "usage_entropy_from_mean",
    "mutual_information",
    "dispatch_entropy",
    "EvalAccumulator",
]

_LN2 = math.log(2.0)


def _as_float64(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64)
    return torch.as_tensor(values, dtype=torch.float64)


def _entropy_nats(p: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``-sum p ln p`` with 0 ln 0 = 0 (``xlogy`` is 0 where p is 0, gradient-safe)."""
    terms = torch.special.xlogy(p, p)
    return -(terms.sum() if dim is None else terms.sum(dim=dim))


def entropy_bits(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy in bits of distributions along ``dim``, with 0 * log 0 = 0 (docs/papers.md A.7)."""
    return _entropy_nats(_as_float64(p), dim=dim) / _LN2


def sample_entropy(gate_probs_BE: torch.Tensor) -> float:
    """H_s: mean over samples of the entropy (bits) of each sample's gate distribution.

    Low H_s means the gate commits each sample to few experts (docs/papers.md A.7). This is
    the exact per-sample mean; the reference tables average per-batch means with equal
    batch weights, which equals it only for one-batch loaders.
    """
    if gate_probs_BE.dim() != 2:
        raise ValueError(f"gate_probs must have shape (B, E), got {tuple(gate_probs_BE.shape)}")
    if gate_probs_BE.shape[0] == 0:
        return 0.0
    return float(entropy_bits(gate_probs_BE, dim=1).mean())


def usage_entropy_from_mean(mean_probs_E: torch.Tensor) -> float:
    """H_u from the mean gate vector p-bar: ``-sum_e pbar_e log2 pbar_e`` (docs/papers.md A.7)."""
    return float(entropy_bits(_as_float64(mean_probs_E).reshape(-1), dim=0))


def usage_entropy(gate_probs_BE: torch.Tensor) -> float:
    """H_u: entropy (bits) of the gate vector averaged over the given samples.

    High H_u means all experts are used; pass the whole evaluation set (or use
    :class:`EvalAccumulator`), not a last batch (docs/papers.md A.7, FLAG-BUG).
    """
    if gate_probs_BE.dim() != 2:
        raise ValueError(f"gate_probs must have shape (B, E), got {tuple(gate_probs_BE.shape)}")
    if gate_probs_BE.shape[0] == 0:
        return 0.0
    return usage_entropy_from_mean(_as_float64(gate_probs_BE).mean(dim=0))


def mutual_information(counts_CE: Any) -> float:
    """I(E;Y) in bits from a class x expert count matrix: ``H(E) + H(Y) - H(E,Y)``.

    Joint ``P = counts / N`` with marginals from row and column sums (docs/papers.md A.7).
    Zero cells are fine (0 log 0 = 0); an all-zero matrix gives 0. The result is clamped
    at 0 against rounding (mutual information is non-negative).
    """
    counts_CE = _as_float64(counts_CE)
    if counts_CE.dim() != 2:
        raise ValueError(
            f"counts must be a 2-D class x expert matrix, got {tuple(counts_CE.shape)}"
        )
    if (counts_CE < 0).any():
        raise ValueError("counts must be non-negative")
    total = counts_CE.sum()
    if total <= 0:
        return 0.0
    joint_CE = counts_CE / total
    h_y = _entropy_nats(joint_CE.sum(dim=1))
    h_e = _entropy_nats(joint_CE.sum(dim=0))
    h_ey = _entropy_nats(joint_CE)
    return max(float((h_e + h_y - h_ey) / _LN2), 0.0)


def dispatch_entropy(counts_KE: Any) -> float:
    """Chen et al.'s dispatch entropy in nats: H(cluster | expert) (docs/papers.md B.4).

    ``counts_KE[k, j]`` = samples of cluster k routed to expert j. For each expert,
    ``H_j = -sum_k q_kj ln q_kj`` with ``q_kj = counts[k, j] / n_j``; the result is
    ``sum_j (n_j / N) H_j``. Empty experts contribute 0. It is 0 when each expert receives a
    single cluster and ln K when every expert receives all K clusters equally.
    """
    counts_KE = _as_float64(counts_KE)
    if counts_KE.dim() != 2:
        raise ValueError(
            f"counts must be a 2-D cluster x expert matrix, got {tuple(counts_KE.shape)}"
        )
    if (counts_KE < 0).any():
        raise ValueError("counts must be non-negative")
    total = counts_KE.sum()
    if total <= 0:
        return 0.0
    n_E = counts_KE.sum(dim=0)
    q_KE = counts_KE / n_E.clamp_min(1e-300)  # empty columns stay all-zero: H_j = 0
    h_E = _entropy_nats(q_KE, dim=0)
    return float((n_E / total * h_E).sum())


class EvalAccumulator:
    """Exact evaluation metrics accumulated over a whole evaluation set.

    Call :meth:`update` for every batch, all-reduce (sum) the tensors of
    :meth:`state_tensors` once across ranks if distributed, then call :meth:`compute`.
    All state lives in one float64 buffer (exact counts up to 2^53), so the all-reduce is
    a single collective and every rank computes identical results (docs/design.md, choice 7).

    Tables are kept class-major internally (``counts_CE``) and reported expert-major in
    ``selection_table`` as the paper's figures show them (docs/papers.md A.7).
    """

    def __init__(
        self, num_experts: int, num_classes: int, num_clusters: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if num_experts < 0 or num_classes < 1 or num_clusters < 0:
            raise ValueError(
                f"need num_experts >= 0, num_classes >= 1, num_clusters >= 0; got "
                f"{num_experts}, {num_classes}, {num_clusters}"
            )
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.num_clusters = num_clusters
        E, C, K = num_experts, num_classes, num_clusters
        # name -> shape; the order fixes the layout of the flat buffer.
        self._layout: dict[str, tuple[int, ...]] = {
            "num_samples": (),
            "correct": (),
            "loss_sum": (),
            "num_gated": (),        # samples that came with gate probabilities
            "num_routed": (),       # samples that came with a selected expert
            "num_predicted": (),    # samples that came with the selected expert's prediction
            "entropy_sum": (),      # sum over samples of H(p(x)) in bits
            "gate_sum_E": (E,),
            "hard_CE": (C, E),      # count[true class, selected expert]
            "soft_CE": (C, E),      # sum of gate probabilities per true class and expert
            "pred_CE": (C, E),      # count[selected expert's predicted class, expert] (A.7 code)
            "expert_correct_E": (E,),
            "cluster_KE": (K, E),
        }
        sizes = [math.prod(shape) for shape in self._layout.values()]
        self._buffer = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        self._views: dict[str, torch.Tensor] = {}
        offset = 0
        for (name, shape), size in zip(self._layout.items(), sizes):
            self._views[name] = self._buffer.narrow(0, offset, size).view(shape)
            offset += size

    # ------------------------------------------------------------------ accumulation

    def reset(self) -> None:
        """Zero all accumulators (e.g. before the next evaluation)."""
        self._buffer.zero_()

    def state_tensors(self) -> list[torch.Tensor]:
        """Tensors to sum across ranks (in place) before :meth:`compute`: one flat buffer."""
        return [self._buffer]

    def _index(
        self, values: torch.Tensor | None, name: str, upper: int, batch: int
    ) -> torch.Tensor | None:
        """Flatten an index tensor onto the buffer's device and check its length and range."""
        if values is None:
            return None
        values = values.detach().to(self._buffer.device).long().reshape(-1)
        if values.numel() != batch:
            raise ValueError(f"{name} has {values.numel()} entries for a batch of {batch}")
        if batch and (int(values.min()) < 0 or int(values.max()) >= upper):
            raise ValueError(
                f"{name} values must lie in [0, {upper}), "
                f"got {int(values.min())}..{int(values.max())}"
            )
        return values

    def _pair_counts(
        self, rows_B: torch.Tensor, expert_B: torch.Tensor, num_rows: int
    ) -> torch.Tensor:
        """Counts of (row, expert) pairs as a (num_rows, E) table, via one bincount."""
        E = self.num_experts
        return torch.bincount(rows_B * E + expert_B, minlength=num_rows * E).view(num_rows, E)

    @torch.no_grad()
    def update(
        self,
        labels_B: torch.Tensor,
        output_BC: torch.Tensor,
        gate_probs_BE: torch.Tensor | None = None,
        expert_index_B: torch.Tensor | None = None,
        top_expert_pred_B: torch.Tensor | None = None,
        clusters_B: torch.Tensor | None = None,
        loss_sum: float = 0.0,
    ) -> None:
        """Add one batch.

        labels_B: true classes. output_BC: the model's output (probabilities or logits; only
        the argmax is used). gate_probs_BE: gate probabilities (None for a single model).
        expert_index_B: the selected (top-1) expert; defaults to argmax of the gate, and must
        be given for top-k routing where the choice includes noise. top_expert_pred_B: the
        class predicted by the selected expert's own output, for the reference code's I(E;Y)
        variant (docs/papers.md A.7). clusters_B: cluster ids of Chen et al.'s data (B.4).
        loss_sum: the *sum* of per-sample losses over the batch (batch mean x batch size),
        so that ``loss`` is an exact per-sample mean over the set.
        """
        v = self._views
        device = self._buffer.device
        if output_BC.dim() != 2 or output_BC.shape[1] != self.num_classes:
            raise ValueError(
                f"output must have shape (B, {self.num_classes}), got {tuple(output_BC.shape)}"
            )
        B = output_BC.shape[0]
        labels_B = self._index(labels_B, "labels", self.num_classes, B)
        correct_B = (output_BC.detach().to(device).argmax(dim=1) == labels_B).to(torch.float64)
        v["num_samples"] += B
        v["correct"] += correct_B.sum()
        v["loss_sum"] += float(loss_sum)

        if gate_probs_BE is not None:
            probs_BE = self._add_gate(gate_probs_BE, labels_B)
            if expert_index_B is None:
                expert_index_B = probs_BE.argmax(dim=1)
        expert_B = self._index(expert_index_B, "expert_index", self.num_experts, B)
        if expert_B is None:
            if top_expert_pred_B is not None or clusters_B is not None:
                raise ValueError("top_expert_pred and clusters need gate_probs or expert_index")
            return
        self._add_routing(labels_B, expert_B, correct_B, top_expert_pred_B, clusters_B)

    def _add_gate(self, gate_probs_BE: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """A batch's gate probabilities: entropies, usage and the soft selection table."""
        v, B, E = self._views, len(labels_B), self.num_experts
        if gate_probs_BE.shape != (B, E):
            raise ValueError(f"gate_probs must have shape ({B}, {E}), got {tuple(gate_probs_BE.shape)}")
        probs_BE = gate_probs_BE.detach().to(device=self._buffer.device, dtype=torch.float64)
        v["num_gated"] += B
        v["entropy_sum"] += entropy_bits(probs_BE, dim=1).sum()
        v["gate_sum_E"] += probs_BE.sum(dim=0)
        v["soft_CE"].index_add_(0, labels_B, probs_BE)
        return probs_BE

    def _add_routing(self, labels_B: torch.Tensor, expert_B: torch.Tensor, correct_B: torch.Tensor,
                     top_expert_pred_B: torch.Tensor | None, clusters_B: torch.Tensor | None) -> None:
        """A batch's selected experts: selection tables, per-expert accuracy, cluster counts."""
        v, B, E = self._views, len(labels_B), self.num_experts
        v["num_routed"] += B
        v["hard_CE"] += self._pair_counts(labels_B, expert_B, self.num_classes)
        v["expert_correct_E"] += torch.bincount(expert_B, weights=correct_B, minlength=E)

        pred_B = self._index(top_expert_pred_B, "top_expert_pred", self.num_classes, B)
        if pred_B is not None:
            v["num_predicted"] += B
            v["pred_CE"] += self._pair_counts(pred_B, expert_B, self.num_classes)

        if clusters_B is not None:
            if self.num_clusters == 0:
                raise ValueError("clusters given but the accumulator was built with num_clusters=0")
            clusters_B = self._index(clusters_B, "clusters", self.num_clusters, B)
            v["cluster_KE"] += self._pair_counts(clusters_B, expert_B, self.num_clusters)

    # ------------------------------------------------------------------------ results

    def compute(self) -> dict[str, Any]:
        """Metrics over everything accumulated, as plain Python values.

        Always: ``num_samples``, ``accuracy``, ``error``, ``loss`` (None when nothing was
        accumulated). For a MoE (gate probabilities or selected experts were given):
        ``mutual_information`` (true labels, the default: paper Appendix A wording),
        ``selection_table`` (experts x classes, ints), ``samples_per_expert``,
        ``per_expert_accuracy`` (accuracy of the MoE output on the samples whose top expert
        is e; None for experts with no samples), ``experts_used`` (experts receiving > 1% of
        the samples). Present only when their inputs were given, so that ``key in result``
        says whether a metric exists and no value is ever None:
        ``sample_entropy``, ``usage_entropy``, ``soft_selection_table`` (gate
        probabilities), ``mutual_information_predicted`` (the reference code's variant,
        top_expert_pred), ``dispatch_entropy`` (nats; clusters, with ``num_clusters > 0``).
        A single model (no gate) gets none of the MoE keys.
        """
        v = {name: t.detach().cpu() for name, t in self._views.items()}
        n = int(v["num_samples"])
        result: dict[str, Any] = {"num_samples": n}
        if n > 0:
            accuracy = float(v["correct"]) / n
            result.update(accuracy=accuracy, error=1.0 - accuracy, loss=float(v["loss_sum"]) / n)
        else:
            result.update(accuracy=None, error=None, loss=None)

        num_gated = int(v["num_gated"])
        num_routed = int(v["num_routed"])
        if num_routed == 0:
            return result  # a single model: no MoE keys

        if num_gated > 0:
            result["sample_entropy"] = float(v["entropy_sum"]) / num_gated
            result["usage_entropy"] = usage_entropy_from_mean(v["gate_sum_E"] / num_gated)
            result["soft_selection_table"] = [
                [float(c) for c in row] for row in v["soft_CE"].t().tolist()
            ]
        hard_CE = v["hard_CE"]
        result["mutual_information"] = mutual_information(hard_CE)
        if int(v["num_predicted"]) > 0:
            result["mutual_information_predicted"] = mutual_information(v["pred_CE"])
        result["selection_table"] = [[int(c) for c in row] for row in hard_CE.t().round().tolist()]
        per_expert_E = hard_CE.sum(dim=0)
        result["samples_per_expert"] = [int(c) for c in per_expert_E.round().tolist()]
        result["per_expert_accuracy"] = [
            (float(correct) / float(total)) if total > 0 else None
            for correct, total in zip(v["expert_correct_E"].tolist(), per_expert_E.tolist())
        ]
        result["experts_used"] = int((per_expert_E > 0.01 * num_routed).sum())
        if self.num_clusters > 0 and float(v["cluster_KE"].sum()) > 0:
            result["dispatch_entropy"] = dispatch_entropy(v["cluster_KE"])
        return result
