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
  - ``topk``: index-based, one copy per destination rank, combined there. A sample's row
    goes once to each rank that holds at least one of its (kept) chosen experts, with K
    small integers saying which local experts there want it and the K gate weights; the
    receiving rank runs each of them on the row, sums their weighted outputs (float32) and
    sends back ONE row per (sample, rank), which the sample's rank sums. Exchanges: one
    fixed-size all-to-all of counts (units and pairs per destination and local expert) and
    its one host sync for the splits, one of the metadata, one of the token rows, one of
    the weights, one of the combined outputs; the rows' backward is a hand-written autograd
    Function (:class:`_SendRows`), the weights' and the return's autograd's own
    (``all_to_all_rows`` and the segment sums of ``moe_dist.parallel.segments``, which add a
    unit's pairs and a sample's units natively in one pass). Evaluation (``need_top``) also
    returns the unweighted top-1 output, in the same rows. Without weights the outputs come back per
    (sample, slot) pair instead (:class:`_ReturnRows`). The local experts run on their rows
    sorted by expert (ragged ``forward_grouped`` for FFN experts, else a padded
    ``[L, N, ...]`` batch). Bytes: the token rows sent and the rows returned are both the
    per-rank minimum (``min_remote_rows``). Cost and bytes scale with the routed pairs, not
    with E (no one-hot ``[S, E, capacity]`` tensors). Dropless by default; with a capacity
    factor each rank sends at most ``ceil(cf * B_r * K / E)`` pairs per expert (top-1
    choices first) and the dropped pairs contribute zero.
  - gate losses over the *global* batch (docs/design.md, choice 4): L_cv from the all-reduced
    importance vector; L_s from each rank's rows of the distance matrix against the gathered
    batch, normalised by the global maximum. Each rank returns its *share*, so that the
    shares sum to the single-process loss and gradients sum (``collectives``).
  - routing noise is drawn for the whole global batch on every rank (same seed, same
    draws) and each rank keeps its rows: the noisy routing equals the single-process one.

Every rank runs every collective of a forward pass whatever its batch (even zero samples),
so a rank that routes nothing to some expert, or has an uneven last batch, cannot hang.

Shape legend: B local batch; G gathered batch (the EP group's or the world's); E all
experts; L local experts (this rank's block; W the widest block); P EP group size; K experts
per sample; S = B*K (sample, slot) pairs; U units (sample, destination rank) sent or received;
Q local pairs computed here; R rows of an expert batch; N rows per local expert (padded); C
expert output features; H hidden features; D flattened input features; F = U*K entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from moe_dist import losses
from moe_dist.parallel import collectives as coll
from moe_dist.parallel.groups import ParallelContext
from moe_dist.parallel.segments import Segments, segment_sum, weighted_segment_sum
from moe_dist.parallel.traffic import count_all_gather

__all__ = ["BatchLayout", "LocalDispatch", "ExpertParallelDispatch", "capacity_keep",
           "run_expert_batch", "routing_capacity"]

# The traffic heading (moe_dist.parallel.traffic) of the experts' inputs, outputs and their
# gradients; counts, routing metadata, layouts and gate losses stay under "other".
DISPATCH = "dispatch"


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
        # Where routing noise comes from: the default generator, or a stacked run's own
        # (moe_dist.train.stacked), which then also serves its evaluation's noise.
        self.generator: torch.Generator | None = None

    def layout(self, batch_size: int) -> BatchLayout:
        return BatchLayout((batch_size,), 0)

    def noise(self, kind: str, logits_BE: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Routing noise for this rank's rows: standard normal or U[0, 1)."""
        draw = torch.randn if kind == "gaussian" else torch.rand
        return draw(logits_BE.shape, generator=self.generator, dtype=logits_BE.dtype, device=logits_BE.device)

    def dense(self, experts, x: torch.Tensor, layout: BatchLayout, need_hidden: bool):
        """Every expert on every local sample: ``(out_EBC, hidden_EBH)``."""
        return experts(x, shared=True)

    def topk(self, experts, x: torch.Tensor, index_BK: torch.Tensor, num_experts: int,
             capacity_factor: float = 0.0, weights_BK: torch.Tensor | None = None, need_top: bool = False):
        """Run each sample through its K chosen experts only (see :meth:`topk_slots`).

        Without ``weights_BK``: the per-slot outputs, ``(y_BKC, counts_E, stats)``. With the
        gate weights ``[B, K]`` (float32): the combined output ``y_BC = sum_k w_bk *
        f_{e_bk}(x_b)`` in float32 (dropped pairs contribute zero) and the unweighted top-1
        (slot 0) output ``top_BC``: ``(y_BC, top_BC, counts_E, stats)``. ``top_BC`` is
        returned when ``need_top`` (evaluation, I(E;Y)), or here in one process always,
        where it costs nothing; an expert-parallel dispatcher returns None without
        ``need_top``.
        """
        y_BKC, counts_E, stats = self.topk_slots(experts, x, index_BK, num_experts, capacity_factor)
        if weights_BK is None:
            return y_BKC, counts_E, stats
        y_BC = (y_BKC.to(weights_BK.dtype) * weights_BK.unsqueeze(-1)).sum(1)
        return y_BC, y_BKC[:, 0], counts_E, stats

    def topk_slots(self, experts, x: torch.Tensor, index_BK: torch.Tensor, num_experts: int,
                   capacity_factor: float = 0.0):
        """Run each sample through its K chosen experts only, one output per (sample, slot).

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
    Expert-parallel only: remote_rows_sent, min_remote_rows, remote_rows_returned (see
    :meth:`ExpertParallelDispatch.topk`).
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
        # expert id -> the EP rank that holds it
        self._owner_E = [r for r, block in enumerate(self.blocks) for _ in block]
        self._widest = max(len(block) for block in self.blocks)
        self._maps_device: torch.device | None = None  # where _maps_cache lives (see _maps)
        self._maps_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def __deepcopy__(self, memo):  # process groups cannot be copied; copies share them
        return self

    # ------------------------------------------------------------------ batch layout
    def layout(self, batch_size: int) -> BatchLayout:
        """All ranks' batch sizes (one small all-gather per forward pass)."""
        if self.world_size == 1:
            return BatchLayout((batch_size,), 0)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        mine = torch.tensor([batch_size], dtype=torch.int64)
        count_all_gather("other", mine, None)
        torch.distributed.all_gather(sizes, mine)
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
        x_G = coll.all_gather_rows(x, sizes, self.ctx.ep_rank, self.ctx.ep_group, kind=DISPATCH)
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
                                    [g * L * F_ for g in sizes], self.ctx.ep_group, kind=DISPATCH)
        z_EBF = torch.cat([part.view(B, n, F_).transpose(0, 1)  # rank order = global expert order
                           for part, n in zip(recv.split(recv_splits), counts)])
        if need_hidden:
            return z_EBF[..., :C], z_EBF[..., C:]
        return z_EBF, None

    def _maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert id: its EP rank and its index in that rank's block (cached per device)."""
        if self._maps_device != device:
            owner = torch.tensor(self._owner_E, device=device)
            local = torch.tensor([i for block in self.blocks for i in range(len(block))], device=device)
            self._maps_cache, self._maps_device = (owner, local), device
        return self._maps_cache

    def topk(self, experts, x: torch.Tensor, index_BK: torch.Tensor, num_experts: int,
             capacity_factor: float = 0.0, weights_BK: torch.Tensor | None = None, need_top: bool = False):
        """One row per (sample, destination rank) there; with the gate weights, one row back.

        See :class:`_Route` for the exchange; the local experts run on their pairs' rows
        sorted by expert (``forward_grouped``, or a padded batch). Returns what
        :meth:`LocalDispatch.topk` returns. With ``weights_BK`` the K weights travel with
        each unit (differentiable: the gate gets its gradient), the receiving rank sums its
        experts' weighted outputs per unit in float32 and sends ONE row back per unit, and
        the sample's rank sums its units: rows returned = rows sent = the per-rank minimum.
        ``need_top`` adds the unweighted slot-0 output to the same returned rows (C more
        columns; evaluation only), else ``top_BC`` is None. Without weights, one output
        per (sample, slot) pair comes back (``topk_slots``' layout).

        The stats add ``remote_rows_sent`` (rows of this rank's samples sent to other
        ranks), ``min_remote_rows`` (distinct (sample, other rank) among the kept pairs: the
        least any dispatch must send; equal to the former) and ``remote_rows_returned``
        (rows other ranks send back to this rank: one per unit with weights, else one per
        remote pair).
        """
        if self.ep_size == 1:
            return super().topk(experts, x, index_BK, num_experts, capacity_factor, weights_BK, need_top)
        B, K = index_BK.shape
        counts_E = torch.bincount(index_BK.reshape(-1), minlength=num_experts)
        keep_S = None
        if capacity_factor > 0:
            keep_S = capacity_keep(index_BK, num_experts, routing_capacity(capacity_factor, B * K, num_experts))
        route = _Route.plan(self, index_BK, keep_S)
        x_Q = _SendRows.apply(x, route)
        if weights_BK is not None:  # all K weights of a unit: the receiver picks its slots
            w_UK = coll.all_to_all_rows(weights_BK.index_select(0, route.sample_U), route.recv_units,
                                        route.send_units, route.group, kind=DISPATCH)
        out_QC, padded = _run_sorted(experts, x_Q, route.counts_L)
        me = self.ctx.ep_rank
        if weights_BK is None:
            y = _ReturnRows.apply(out_QC, route).view(B, K, out_QC.shape[-1])
            returned = sum(route.send_pairs) - route.send_pairs[me]
        else:
            y, top_BC = _combine_units(out_QC, w_UK, route, need_top)
            returned = sum(route.send_units) - route.send_units[me]
        stats = _stats(B * K, sum(route.send_pairs), padded, expert_rows=sum(route.recv_pairs),
                       remote_rows_sent=sum(route.send_units) - route.send_units[me],
                       min_remote_rows=route.min_remote, remote_rows_returned=returned)
        return (y, counts_E, stats) if weights_BK is None else (y, top_BC, counts_E, stats)

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


# ---------------------------------------------------------------------- top-k exchange


@dataclass
class _Route:
    """The exchange plan of one expert-parallel top-k forward pass, both directions.

    A *unit* is a (sample, destination rank) with at least one kept pair there: the sample's
    row travels once per unit, whatever the number of its experts on that rank, so the rows
    sent are the per-rank minimum. With each unit goes a small integer row ``meta_K``: for
    slot k, the local index of the chosen expert if that pair is kept and goes to this rank,
    else -1. The receiver expands units into pairs (sorted by local expert for the bank) and
    returns one output per pair, in (source rank, unit, slot) order, which is the order in
    which the sender sorted its pairs (by rank, stable over sample-major pairs).

    Send side (this rank's samples): ``sample_U`` the sample of each unit in send order
    (grouped by destination), ``pair_P`` the id ``b * K + k`` of each kept pair in the same
    order. Receive side (this rank's experts): ``unit_Q`` the received unit of each local
    pair, pairs sorted by local expert, ``entry_Q`` its entry ``u * K + k`` among the received
    units' slots (to find its gate weight), and ``place_Q`` its position in the per-pair
    return order (``_ReturnRows``; the weighted return sends one row per unit instead).
    """

    group: object
    batch: int
    num_pairs: int
    send_units: tuple[int, ...]
    recv_units: tuple[int, ...]
    send_pairs: tuple[int, ...]
    recv_pairs: tuple[int, ...]
    counts_L: list[int]
    min_remote: int
    sample_U: torch.Tensor
    pair_P: torch.Tensor
    unit_Q: torch.Tensor
    entry_Q: torch.Tensor
    place_Q: torch.Tensor

    @cached_property
    def by_unit(self) -> Segments:
        """The local pairs, by received unit (to sum a unit's pairs)."""
        return Segments(self.unit_Q, sum(self.recv_units))

    @cached_property
    def by_sample(self) -> Segments:
        """The sent units (rows in send order), by sample (to sum a sample's units)."""
        return Segments(self.sample_U, self.batch)

    @classmethod
    def plan(cls, dispatch: ExpertParallelDispatch, index_BK: torch.Tensor, keep_S: torch.Tensor | None):
        B, K = index_BK.shape
        P, W, me = dispatch.ep_size, dispatch._widest, dispatch.ctx.ep_rank
        owner_E, local_E = dispatch._maps(index_BK.device)
        dest_BK = owner_E[index_BK]
        if keep_S is not None:  # a dropped pair goes nowhere: "rank P", sorted last
            dest_BK = dest_BK.masked_fill(~keep_S.view(B, K), P)
        local_BK = local_E[index_BK]
        # slot k opens a unit unless an earlier slot of the sample goes to the same rank
        earlier_KK = torch.ones(K, K, dtype=torch.bool, device=index_BK.device).tril(-1)
        first_BK = ~((dest_BK.unsqueeze(2) == dest_BK.unsqueeze(1)) & earlier_KK).any(2) & (dest_BK < P)
        dest_S = dest_BK.reshape(-1)
        order_S = torch.argsort(dest_S, stable=True)  # by rank, then sample, then slot
        unit_pair_U = order_S[first_BK.reshape(-1)[order_S]]
        sample_U = torch.div(unit_pair_U, K, rounding_mode="floor")
        dest_U = dest_S[unit_pair_U]
        meta_UK = torch.where(dest_BK[sample_U] == dest_U.unsqueeze(1), local_BK[sample_U], -1)
        # per destination: units, then kept pairs per local expert (padded to the widest block)
        pairs_PW = torch.bincount(dest_S * W + local_BK.reshape(-1), minlength=(P + 1) * W)[:P * W]
        msg_PW = torch.cat([torch.bincount(dest_U, minlength=P)[:P].unsqueeze(1), pairs_PW.view(P, W)], 1)
        recv_PW = coll.all_to_all_counts(msg_PW, dispatch.ctx.ep_group)
        min_remote = (first_BK & (dest_BK != me)).sum().view(1)
        host = torch.cat([msg_PW.reshape(-1), recv_PW.reshape(-1), min_remote]).tolist()
        sent, got = host[:P * (W + 1)], host[P * (W + 1):-1]
        send_units, recv_units = tuple(sent[::W + 1]), tuple(got[::W + 1])
        send_pairs = tuple(sum(sent[j * (W + 1) + 1:(j + 1) * (W + 1)]) for j in range(P))
        recv_pairs = tuple(sum(got[j * (W + 1) + 1:(j + 1) * (W + 1)]) for j in range(P))
        counts_L = [sum(got[j * (W + 1) + 1 + i] for j in range(P)) for i in range(len(dispatch.local_experts))]
        meta_UK = coll.exchange_rows(meta_UK.to(_meta_dtype(W)), recv_units, send_units, dispatch.ctx.ep_group)
        entry_Q, place_Q = _local_pairs(meta_UK, W, sum(recv_pairs))
        return cls(dispatch.ctx.ep_group, B, B * K, send_units, recv_units, send_pairs, recv_pairs, counts_L,
                   host[-1], sample_U, order_S[:sum(send_pairs)], torch.div(entry_Q, K, rounding_mode="floor"),
                   entry_Q, place_Q)


def _meta_dtype(widest: int) -> torch.dtype:
    """The smallest integer type of the local expert indices (and -1): a row's metadata costs
    K bytes next to its D * 4 (int8 up to 127 local experts)."""
    return torch.int8 if widest <= 127 else torch.int16 if widest <= 32767 else torch.int32


def _local_pairs(meta_UK: torch.Tensor, widest: int, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Received units -> local pairs sorted by local expert: ``(entry_Q, place_Q)`` (see _Route)."""
    K = meta_UK.shape[1]
    local_F = meta_UK.reshape(-1).long()  # F = U * K entries, unit-major
    valid_F = local_F >= 0
    order_F = torch.argsort(torch.where(valid_F, local_F, widest), stable=True)[:num_pairs]
    place_F = torch.cumsum(valid_F, 0) - 1
    return order_F, place_F[order_F]


class _SendRows(torch.autograd.Function):
    """Forward: one row per unit to its rank, there one copy per local pair (by expert).
    Backward: the pairs' gradients summed per unit, sent back, summed per sample."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, route: _Route) -> torch.Tensor:
        ctx.route = route
        rows = coll.exchange_rows(x.index_select(0, route.sample_U), route.recv_units, route.send_units,
                                  route.group, kind=DISPATCH)
        return rows.index_select(0, route.unit_Q)

    @staticmethod
    def backward(ctx, grad_Q: torch.Tensor):
        route = ctx.route
        grad_U = segment_sum(grad_Q, route.by_unit)
        grad = coll.exchange_rows(grad_U, route.send_units, route.recv_units, route.group, kind=DISPATCH)
        return segment_sum(grad, route.by_sample), None


class _ReturnRows(torch.autograd.Function):
    """Forward: each local pair's output back to its sample's rank, placed at ``(b, k)``
    (zero for dropped pairs). Backward: the reverse gathers and exchange."""

    @staticmethod
    def forward(ctx, out_Q: torch.Tensor, route: _Route) -> torch.Tensor:
        ctx.route = route
        ret = out_Q.new_empty(out_Q.shape).index_copy_(0, route.place_Q, out_Q)
        back = coll.exchange_rows(ret, route.send_pairs, route.recv_pairs, route.group, kind=DISPATCH)
        # zeros only where some pair was dropped: otherwise every row is written
        make = back.new_empty if back.shape[0] == route.num_pairs else back.new_zeros
        return make((route.num_pairs,) + back.shape[1:]).index_copy_(0, route.pair_P, back)

    @staticmethod
    def backward(ctx, grad_S: torch.Tensor):
        route = ctx.route
        grad = coll.exchange_rows(grad_S.index_select(0, route.pair_P), route.recv_pairs, route.send_pairs,
                                  route.group, kind=DISPATCH)
        return grad.index_select(0, route.place_Q), None


def _combine_units(out_QC: torch.Tensor, w_UK: torch.Tensor, route: _Route, need_top: bool):
    """Weighted outputs summed per received unit (float32, like the single-process sum), one
    row back per unit, summed per sample: ``(y_BC, top_BC or None)``. With ``need_top`` the
    unweighted slot-0 output rides in the same row (at most one unit of a sample holds slot
    0; a dropped slot 0 gives zeros, as in ``topk_slots``). Differentiable (the gate weights
    get their gradient): segment sums (``moe_dist.parallel.segments``) and ``all_to_all_rows``."""
    K = w_UK.shape[1]
    out_QC = out_QC.to(w_UK.dtype)
    if need_top:
        z_QC = torch.cat([out_QC * w_UK.reshape(-1).index_select(0, route.entry_Q).unsqueeze(1),
                          out_QC * (route.entry_Q % K == 0).unsqueeze(1)], 1)
        z_UC = segment_sum(z_QC, route.by_unit)
    else:
        z_UC = weighted_segment_sum(out_QC, w_UK.reshape(-1), route.entry_Q, route.by_unit)
    back_UC = coll.all_to_all_rows(z_UC, route.send_units, route.recv_units, route.group, kind=DISPATCH)
    y_BC = segment_sum(back_UC, route.by_sample)
    C = out_QC.shape[1]
    return (y_BC[:, :C], y_BC[:, C:]) if need_top else (y_BC, None)


def _run_sorted(experts, x_Q: torch.Tensor, counts_L: list[int]):
    """Rows sorted by local expert, ``counts_L[i]`` for expert i: ``(out_QC, rows computed)``."""
    counts = torch.tensor(counts_L, device=x_Q.device)
    if _grouped(experts, x_Q):
        return experts.forward_grouped(x_Q, counts, need_hidden=False)[0], x_Q.shape[0]
    expert_Q = torch.repeat_interleave(torch.arange(len(counts_L), device=x_Q.device), counts,
                                       output_size=x_Q.shape[0])
    return run_expert_batch(experts, x_Q, expert_Q, counts_L=counts, cap=max(counts_L, default=0))
