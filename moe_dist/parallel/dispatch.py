"""Dispatch: how a MoE layer reaches its experts and reduces its gate losses over the batch.

The MoE module (``moe_dist.models.moe``) talks to its experts only through a dispatcher, so
that model code holds no ``torch.distributed`` call (docs/design.md, "Code style"):

* :class:`LocalDispatch`, the default: one process, all E experts here, losses over the
  local batch. Bit-for-bit the single-process behaviour.
* :class:`ExpertParallelDispatch`: this rank holds a contiguous block of its EP group's
  experts (``moe_dist.parallel.groups.expert_blocks``: sizes differ by at most one, so
  ``ep_size`` need not divide E) and a share of the global batch.

  - ``dense`` / ``attentive``: gather the EP group's inputs, run the local experts on all of
    them, and send each sample's outputs (and, attentive, hidden states) back to its rank
    with one all-to-all: every expert sees every sample of the group (docs/design.md, choice 3).
  - ``topk``: index-based. The (sample, slot) pairs are sorted by expert, which groups them
    by destination rank (blocks are contiguous in rank order); one all-to-all of the
    per-expert counts (padded to the largest block, so every rank sends the same shape), one
    variable-split all-to-all of the routed rows, the local experts run on a padded ``[L, N, ...]``
    batch, and the reverse all-to-all brings each pair's output back, where it is scattered
    to its (sample, slot). Cost and bytes scale with the routed pairs, not with E (no
    one-hot ``[S, E, capacity]`` tensors). Dropless by default; with a capacity factor each
    rank sends at most ``ceil(cf * B_r * K / E)`` pairs per expert (top-1 choices first)
    and the dropped pairs contribute zero.
  - gate losses over the *global* batch (docs/design.md, choice 4): L_cv from the all-reduced
    importance vector; L_s from each rank's rows of the distance matrix against the gathered
    batch, normalised by the global maximum. Each rank returns its *share*, so that the
    shares sum to the single-process loss and gradients sum (``collectives``).
  - routing noise is drawn for the whole global batch on every rank (same seed, same
    draws) and each rank keeps its rows: the noisy routing equals the single-process one.

Every rank runs every collective of a forward pass whatever its batch (even zero samples),
so a rank that routes nothing to some expert, or has an uneven last batch, cannot hang.

Shape legend: B local batch; G gathered batch (the EP group's or the world's); E all
experts; L local experts (this rank's block; Lmax the largest block); P EP group size; K experts per sample; S = B*K
(sample, slot) pairs; R rows received for the local experts; N rows per local expert
(padded); C expert output features; H hidden features; D flattened input features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_dist import losses
from moe_dist.parallel import collectives as coll
from moe_dist.parallel.groups import ParallelContext

__all__ = ["BatchLayout", "LocalDispatch", "ExpertParallelDispatch", "capacity_keep",
           "run_expert_batch", "routing_capacity"]


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch is split over the data-parallel ranks."""

    sizes: tuple[int, ...]
    """Samples per rank, in rank order."""
    index: int
    """This rank's position."""

    @property
    def local(self) -> int:
        return self.sizes[self.index]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        """Position of this rank's first sample in the global batch."""
        return sum(self.sizes[: self.index])


def routing_capacity(capacity_factor: float, num_pairs: int, num_experts: int) -> int:
    """Rows one rank may send to one expert: ``ceil(cf * pairs / E)`` (GShard's capacity)."""
    return math.ceil(capacity_factor * num_pairs / num_experts)


def capacity_keep(index_BK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which (sample, slot) pairs fit in each expert's capacity, ``[S]`` bool, sample-major.

    Priority goes to earlier slots (every top-1 choice before any top-2 choice, as in
    GShard), then to earlier samples.
    """
    B, K = index_BK.shape
    expert_P = index_BK.t().reshape(-1)  # slot-major: p = k * B + b
    order_P = torch.argsort(expert_P, stable=True)
    counts_E = torch.bincount(expert_P, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos_P = torch.empty_like(expert_P)
    pos_P[order_P] = torch.arange(expert_P.numel(), device=expert_P.device) - starts_E[expert_P[order_P]]
    return (pos_P < capacity).view(K, B).t().reshape(-1)


def _grouped(experts, x: torch.Tensor) -> bool:
    supports = getattr(experts, "supports_grouped", None)
    return bool(supports is not None and supports(x))


def run_expert_batch(experts, x_R: torch.Tensor, expert_R: torch.Tensor,
                     counts_L: torch.Tensor | None = None, cap: int | None = None):
    """Run rows through their experts: row r goes to expert ``expert_R[r]`` of the bank.

    Rows are placed, per expert in their given order, into a padded ``[L, N, ...]`` batch
    (N = the largest count: nothing dropped here) with a mask for BatchNorm; the bank runs
    once (``shared=False``) and each row's output is gathered back. A bank whose
    ``supports_grouped(x)`` is true instead gets the rows sorted by expert and the counts
    (``forward_grouped``), with no padding. Returns ``(out_RC, rows computed incl. padding)``.
    """
    L = experts.num_experts
    order_R = torch.argsort(expert_R, stable=True)
    if counts_L is None:
        counts_L = torch.bincount(expert_R, minlength=L)
    if _grouped(experts, x_R):  # ragged rows, no padding (FFN experts)
        out_sorted, _ = experts.forward_grouped(x_R[order_R], counts_L)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        return out_sorted[inverse_R], x_R.shape[0]
    starts_L = torch.cumsum(counts_L, 0) - counts_L
    row_R = torch.empty_like(expert_R)
    row_R[order_R] = torch.arange(expert_R.numel(), device=expert_R.device) - starts_L[expert_R[order_R]]
    if cap is None:
        cap = int(counts_L.max()) if expert_R.numel() else 0
    # At least one (masked) row: a rank whose experts receive nothing still runs the bank,
    # and the banks' reshapes need a non-empty batch.
    cap = max(cap, 1)
    x_LN = x_R.new_zeros((L, cap) + tuple(x_R.shape[1:]))
    x_LN[expert_R, row_R] = x_R
    mask_LN = torch.zeros(L, cap, dtype=torch.bool, device=x_R.device)
    mask_LN[expert_R, row_R] = True
    out_LNC, _ = experts(x_LN, shared=False, mask_EN=mask_LN)
    return out_LNC[expert_R, row_R], L * cap


class LocalDispatch:
    """One process holds every expert and the whole batch (the default; today's behaviour)."""

    ep_size = 1
    world_size = 1
    distributed = False

    def __init__(self) -> None:
        self.ctx = ParallelContext.local()

    def layout(self, batch_size: int) -> BatchLayout:
        return BatchLayout((batch_size,), 0)

    def noise(self, kind: str, logits_BE: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Routing noise for this rank's rows: standard normal or U[0, 1)."""
        return torch.randn_like(logits_BE) if kind == "gaussian" else torch.rand_like(logits_BE)

    def dense(self, experts, x: torch.Tensor, layout: BatchLayout, need_hidden: bool):
        """Every expert on every local sample: ``(out_EBC, hidden_EBH)``."""
        return experts(x, shared=True)

    def topk(self, experts, x: torch.Tensor, index_BK: torch.Tensor, num_experts: int,
             capacity_factor: float = 0.0):
        """Run each sample through its K chosen experts only.

        The (sample, slot) pairs are sorted by expert; pair s goes to row ``pos[s]`` of its
        expert's padded batch ``[E, cap, ...]`` (cap = the largest count: dropless), a mask
        marks the real rows, the bank runs once with ``shared=False``, and each pair's output
        is gathered back from ``(expert, row)``. With ``capacity_factor > 0`` pairs beyond
        ``ceil(cf * B * K / E)`` per expert are dropped (output 0). Returns the outputs
        ``[B, K, C]``, the requested pairs per expert ``[E]`` and the routing statistics.
        """
        B, K = index_BK.shape
        expert_S = index_BK.reshape(-1)
        counts_E = torch.bincount(expert_S, minlength=num_experts)
        if capacity_factor > 0 or _grouped(experts, x):
            if capacity_factor > 0:
                keep_S = capacity_keep(index_BK, num_experts,
                                       routing_capacity(capacity_factor, B * K, num_experts))
                kept_S = keep_S.nonzero().squeeze(1)
            else:
                kept_S = torch.arange(B * K, device=x.device)
            out_RC, padded = run_expert_batch(experts, x[kept_S // K], expert_S[kept_S])
            y_SC = out_RC.new_zeros((B * K,) + tuple(out_RC.shape[1:])).index_copy(0, kept_S, out_RC)
            stats = _stats(B * K, kept_S.numel(), padded)
            return y_SC.view(B, K, y_SC.shape[-1]), counts_E, stats
        order_S = torch.argsort(expert_S, stable=True)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        sorted_expert_S = expert_S[order_S]
        row_S = torch.empty_like(expert_S)
        row_S[order_S] = torch.arange(expert_S.numel(), device=x.device) - starts_E[sorted_expert_S]
        cap = max(int(counts_E.max()), 1)  # >= 1: an empty share (B = 0) still runs the bank
        sample_S = torch.arange(B, device=x.device).repeat_interleave(K)
        x_EN = x.new_zeros((num_experts, cap) + x.shape[1:])
        x_EN[expert_S, row_S] = x[sample_S]
        mask_EN = torch.zeros(num_experts, cap, dtype=torch.bool, device=x.device)
        mask_EN[expert_S, row_S] = True
        out_ENC, _ = experts(x_EN, shared=False, mask_EN=mask_EN)
        out_SC = out_ENC[expert_S, row_S]
        return out_SC.view(B, K, out_SC.shape[-1]), counts_E, _stats(B * K, B * K, num_experts * cap)

    def importance_loss(self, probs_BE: torch.Tensor, weight: float) -> torch.Tensor:
        return losses.importance_loss(probs_BE, weight)

    def sample_similarity_loss(self, x_BD: torch.Tensor, probs_BE: torch.Tensor, layout: BatchLayout,
                               beta: float, gamma: float, variant: str, squared: bool) -> torch.Tensor:
        return losses.sample_similarity_loss(x_BD, probs_BE, beta, gamma, variant=variant, squared=squared)


def _run_shared(experts, x_N: torch.Tensor):
    """``experts(x, shared=True)``, also for zero rows (a rank with an empty share of the
    global batch): the banks' reshapes need one row, so one zero row runs and is dropped
    (masked: no BatchNorm statistic counts it)."""
    if x_N.shape[0] > 0:
        return experts(x_N, shared=True)
    no_row_E1 = torch.zeros(experts.num_experts, 1, dtype=torch.bool, device=x_N.device)
    out_ENC, hidden_ENH = experts(x_N.new_zeros((1,) + tuple(x_N.shape[1:])), shared=True, mask_EN=no_row_E1)
    return out_ENC[:, :0], hidden_ENH[:, :0]


def _stats(routed: int, kept: int, padded: int, **extra: int) -> dict[str, int]:
    """Routing statistics of one top-k forward pass on one rank (summable over ranks/steps).

    routed: (sample, slot) pairs requested; dropped: pairs over capacity; expert_rows: real
    rows in this rank's expert batch; padded_rows: rows of that batch with its padding.
    """
    return {"routed": routed, "dropped": routed - kept, "expert_rows": extra.pop("expert_rows", kept),
            "padded_rows": padded, **extra}


class ExpertParallelDispatch(LocalDispatch):
    """This rank holds the experts ``ctx.local_experts(E)`` and a share of the global batch.

    The data-parallel group of the batch-level reductions is the whole world; the expert
    all-to-alls run within the EP group.
    """

    distributed = True

    def __init__(self, ctx: ParallelContext, num_experts: int, unit: int = 1) -> None:
        super().__init__()
        self.ctx = ctx
        self.ep_size = ctx.ep_size
        self.world_size = ctx.world_size
        self.num_experts = num_experts
        self.blocks = ctx.expert_blocks(num_experts, unit)
        self.local_experts = self.blocks[ctx.ep_rank]
        # expert id -> the EP rank that holds it; and (rank, local index) -> expert id, padded
        # to the largest block with E, the index of a zero count appended in topk
        self._owner_E = [r for r, block in enumerate(self.blocks) for _ in block]
        widest = max(len(block) for block in self.blocks)
        self._slot_PL = [[block[i] if i < len(block) else num_experts for i in range(widest)]
                         for block in self.blocks]

    def __deepcopy__(self, memo):  # process groups cannot be copied; copies share them
        return self

    # ------------------------------------------------------------------ batch layout
    def layout(self, batch_size: int) -> BatchLayout:
        """All ranks' batch sizes (one small all-gather per forward pass)."""
        if self.world_size == 1:
            return BatchLayout((batch_size,), 0)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, torch.tensor([batch_size], dtype=torch.int64))
        return BatchLayout(tuple(int(s) for s in torch.cat(sizes).tolist()), self.ctx.rank)

    def _ep_sizes(self, layout: BatchLayout) -> tuple[int, ...]:
        return tuple(layout.sizes[r] for r in self.ctx.ep_ranks)

    def noise(self, kind: str, logits_BE: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        # Every rank draws the global batch's noise and keeps its rows: same draws as one
        # process on the concatenated batch, and the RNG streams stay in step across ranks.
        shape = (layout.total, logits_BE.shape[1])
        kw = {"dtype": logits_BE.dtype, "device": logits_BE.device}
        full = torch.randn(shape, **kw) if kind == "gaussian" else torch.rand(shape, **kw)
        return full[layout.offset: layout.offset + layout.local]

    # ------------------------------------------------------------------ experts
    def dense(self, experts, x: torch.Tensor, layout: BatchLayout, need_hidden: bool):
        P, B = self.ep_size, x.shape[0]
        if P == 1:
            return _run_shared(experts, x)
        sizes = self._ep_sizes(layout)
        x_G = coll.all_gather_rows(x, sizes, self.ctx.ep_rank, self.ctx.ep_group)
        out_LGC, hidden_LGH = _run_shared(experts, x_G)
        C = out_LGC.shape[-1]
        z_LGF = torch.cat([out_LGC, hidden_LGH.to(out_LGC.dtype)], -1) if need_hidden else out_LGC
        L, F_ = z_LGF.shape[0], z_LGF.shape[-1]
        # Sample-major (samples already in rank order), so that each rank's samples are one
        # split. Blocks may differ by one expert, so a sample's row is L * F wide here but
        # L_j * F on rank j: the all-to-all moves flat elements, split per rank.
        counts = [len(block) for block in self.blocks]
        recv_splits = [B * n * F_ for n in counts]
        recv = coll.all_to_all_rows(z_LGF.transpose(0, 1).reshape(-1), recv_splits,
                                    [g * L * F_ for g in sizes], self.ctx.ep_group)
        z_EBF = torch.cat([part.view(B, n, F_).transpose(0, 1)  # rank order = global expert order
                           for part, n in zip(recv.split(recv_splits), counts)])
        if need_hidden:
            return z_EBF[..., :C], z_EBF[..., C:]
        return z_EBF, None

    def topk(self, experts, x: torch.Tensor, index_BK: torch.Tensor, num_experts: int,
             capacity_factor: float = 0.0):
        P = self.ep_size
        if P == 1:
            return super().topk(experts, x, index_BK, num_experts, capacity_factor)
        B, K = index_BK.shape
        L = len(self.local_experts)
        expert_S = index_BK.reshape(-1)
        counts_E = torch.bincount(expert_S, minlength=num_experts)
        if capacity_factor > 0:
            keep_S = capacity_keep(index_BK, num_experts, routing_capacity(capacity_factor, B * K, num_experts))
            pairs_S = keep_S.nonzero().squeeze(1)
        else:
            pairs_S = torch.arange(B * K, device=x.device)
        kept_expert = expert_S[pairs_S]
        order = torch.argsort(kept_expert, stable=True)
        send_pairs = pairs_S[order]  # pair ids grouped by expert, hence by destination rank
        send_E = torch.bincount(kept_expert, minlength=num_experts)
        # counts per (rank, local expert), padded to the largest block: the same shape on
        # every rank, zeros in the padding (so they add no row anywhere)
        slot_PL = torch.tensor(self._slot_PL, device=x.device)
        send_PL = torch.cat([send_E, send_E.new_zeros(1)])[slot_PL]
        recv_PL = coll.all_to_all_counts(send_PL, self.ctx.ep_group)
        # Remote destinations a pair's token must reach at least once (bytes lower bound):
        dest_BK = torch.tensor(self._owner_E, device=x.device)[index_BK]
        if capacity_factor > 0:
            dest_BK = torch.where(keep_S.view(B, K), dest_BK, torch.full_like(dest_BK, self.ctx.ep_rank))
        dest_sorted = dest_BK.sort(dim=1).values
        distinct_BK = torch.ones_like(dest_sorted, dtype=torch.bool)
        distinct_BK[:, 1:] = dest_sorted[:, 1:] != dest_sorted[:, :-1]
        min_remote = (distinct_BK & (dest_sorted != self.ctx.ep_rank)).sum()
        host = torch.cat([send_PL.sum(1), recv_PL.sum(1), recv_PL.sum(0)[:L], min_remote.view(1)]).tolist()
        send_splits, recv_splits = host[:P], host[P:2 * P]
        counts_L, min_remote = host[2 * P:2 * P + L], host[-1]

        x_send = x[send_pairs // K]
        x_recv = coll.all_to_all_rows(x_send, recv_splits, send_splits, self.ctx.ep_group)
        local_R = torch.arange(recv_PL.shape[1], device=x.device).repeat(P).repeat_interleave(recv_PL.reshape(-1))
        out_RC, padded = run_expert_batch(experts, x_recv, local_R,
                                          counts_L=torch.tensor(counts_L, device=x.device),
                                          cap=max(counts_L) if counts_L else 0)
        y_send = coll.all_to_all_rows(out_RC, send_splits, recv_splits, self.ctx.ep_group)
        y_SC = y_send.new_zeros((B * K,) + tuple(y_send.shape[1:])).index_copy(0, send_pairs, y_send)
        me = self.ctx.ep_rank
        remote_sent = sum(send_splits) - send_splits[me]
        stats = _stats(B * K, send_pairs.numel(), padded, expert_rows=sum(recv_splits),
                       remote_rows_sent=remote_sent, min_remote_rows=min_remote)
        return y_SC.view(B, K, y_SC.shape[-1]), counts_E, stats

    # ------------------------------------------------------------------ gate losses
    def importance_loss(self, probs_BE: torch.Tensor, weight: float) -> torch.Tensor:
        if self.world_size == 1:
            return super().importance_loss(probs_BE, weight)
        importance_E = coll.all_reduce_sum(probs_BE.sum(dim=0), self.ctx.dp_group)
        return losses.importance_loss_from_importance(importance_E, weight) / self.world_size

    def sample_similarity_loss(self, x_BD: torch.Tensor, probs_BE: torch.Tensor, layout: BatchLayout,
                               beta: float, gamma: float, variant: str, squared: bool) -> torch.Tensor:
        if self.world_size == 1:
            return super().sample_similarity_loss(x_BD, probs_BE, layout, beta, gamma, variant, squared)
        group = self.ctx.dp_group
        x_GD = coll.all_gather_rows(x_BD.detach(), layout.sizes, layout.index, group)
        probs_GE = coll.all_gather_rows(probs_BE, layout.sizes, layout.index, group)
        if x_BD.shape[0]:
            dist_BG = losses.sample_distances(x_BD, x_GD, squared=squared)
        else:  # no sample here (a global batch smaller than the world): no rows
            dist_BG = x_BD.new_zeros((0, layout.total))
        local_max = dist_BG.max() if dist_BG.numel() else dist_BG.new_zeros(())
        dist_BG = losses.normalize_distances(dist_BG, coll.all_reduce_max(local_max, group))
        S, T = losses.similarity_terms(dist_BG, probs_BE, probs_GE)
        return losses.combine_similarity_terms(S, T, layout.total, beta, gamma, variant)
