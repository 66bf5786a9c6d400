"""Global BatchNorm: under several processes every BatchNorm normalises with the statistics of
the *global* batch, as SyncBatchNorm does, so N processes follow the one-process run.

Model code holds a statistics object (``batch_stats``), as the MoE holds its dispatcher: the
default :class:`LocalBatchStats` changes nothing, and a BatchNorm with it is bit-for-bit
``nn.BatchNorm2d`` (or today's stacked BatchNorm). :func:`install_batch_stats`, called by
:func:`~moe_dist.parallel.model.parallelize`, gives each BatchNorm a :class:`GroupBatchStats`
over the ranks whose rows together make the global batch it normalises:

* replicated modules (gates, a single model's network, experts when ep_size == 1): the world;
* a sharded expert bank: its expert-data-parallel group (the EP all-to-all already brings
  each expert every row its EP group routed to it); none when world == ep_size.

Each rank computes, per channel, its row count n_r, mean m_r and sum of squared deviations
M2_r (two-pass, in at least float32), and one differentiable all-reduce combines them
(Chan et al.: n = sum n_r, mean = sum n_r m_r / n, M2 = sum M2_r + n_r (m_r - mean)^2), which
avoids the cancellation of sum(x^2) - n mean^2. The all-reduce's adjoint (``collectives``)
makes gradients exact under the package's convention (each rank's loss is its share, gradients
are summed). Normalisation uses the biased global variance M2 / n, the running statistics the
unbiased M2 / (n - 1), so every rank holds the same, global, running statistics and a
checkpoint's are the one-process ones. A rank with no row still runs the collective and adds
nothing (n_r = 0); a channel group with no row anywhere keeps its running statistics.

Shape legend: N rows; G groups of channels sharing a row mask (the experts of a stacked
BatchNorm; 1 for a plain one); C channels per group; S spatial positions; P ranks in the group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.parallel import collectives as coll
from moe_dist.parallel.groups import ParallelContext

__all__ = ["BatchNorm2d", "LocalBatchStats", "GroupBatchStats", "batch_norm_global", "install_batch_stats"]


class LocalBatchStats:
    """One process (or a group of one): the local batch is the whole batch, and a BatchNorm
    holding this runs exactly as it does without moe_dist.parallel."""

    distributed = False

    def combine(self, count_GC: torch.Tensor, mean_GC: torch.Tensor,
                m2_GC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return count_GC, mean_GC, m2_GC

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks that share the statistics (not differentiable: for a
        backward written out, e.g. the native gate block's sums of the output gradient)."""
        return x

    def all_agree(self, key: str, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank that shares the statistics, asked once per
        ``key`` and remembered (a collective the first time: every rank must ask it at the same
        point). For choices that must be the same everywhere, e.g. the native gate block,
        whose availability each process finds out for itself."""
        return flag


class GroupBatchStats(LocalBatchStats):
    """Statistics combined over the ranks of ``group`` (None: the world); ``index`` is this
    rank's position in it."""

    distributed = True

    def __init__(self, group: dist.ProcessGroup | None, size: int, index: int) -> None:
        self.group, self.size, self.index = group, size, index

    def __deepcopy__(self, memo):  # process groups cannot be copied; copies share them
        return self

    def combine(self, count_GC, mean_GC, m2_GC):
        # An all-gather made of one all-reduce (each rank fills its own row, zeros elsewhere):
        # exact adjoint from all_reduce_sum, and P * 3 * G * C floats is small.
        mine_3GC = torch.stack([count_GC, mean_GC, m2_GC])
        rows_P3GC = torch.cat([mine_3GC.new_zeros((self.index,) + mine_3GC.shape), mine_3GC[None],
                               mine_3GC.new_zeros((self.size - self.index - 1,) + mine_3GC.shape)])
        count_PGC, mean_PGC, m2_PGC = coll.all_reduce_sum(rows_P3GC, self.group).unbind(1)
        count_GC = count_PGC.sum(0)
        mean_GC = (count_PGC * mean_PGC).sum(0) / count_GC.clamp(min=1)
        m2_GC = (m2_PGC + count_PGC * (mean_PGC - mean_GC).square()).sum(0)
        return count_GC, mean_GC, m2_GC

    def total(self, x):
        return coll.all_reduce_sum(x.detach(), self.group)

    def all_agree(self, key, flag):
        agreed = self.__dict__.setdefault("_agreed", {})
        if key not in agreed:
            missing = torch.tensor([0.0 if flag else 1.0])
            agreed[key] = float(coll.all_reduce_max(missing, self.group)) == 0.0
        return agreed[key]


def _local_moments(x_NGCS: torch.Tensor, mask_NG: torch.Tensor | None):
    """Per channel: row count x positions, mean and sum of squared deviations of the real
    rows; and x centred on that mean."""
    N, G, C, S = x_NGCS.shape
    if mask_NG is None:
        count_GC = x_NGCS.new_full((G, C), float(N * S))
        weight = None
    else:
        weight = mask_NG.to(x_NGCS.dtype)[:, :, None, None]
        count_GC = (weight.sum(0).squeeze(-1) * S).expand(G, C)
    masked = x_NGCS if weight is None else x_NGCS * weight
    mean_GC = masked.sum((0, 3)) / count_GC.clamp(min=1)
    centred = x_NGCS - mean_GC[:, :, None]
    squares = centred.square() if weight is None else centred.square() * weight
    return count_GC, mean_GC, squares.sum((0, 3)), centred


def batch_norm_global(x: torch.Tensor, groups: int, mask_NG: torch.Tensor | None, stats: LocalBatchStats,
                      weight: torch.Tensor | None, bias: torch.Tensor | None,
                      running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                      momentum: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of ``x`` ``[N, G*C, ...]`` with the statistics that ``stats``
    combines (the global batch's). ``mask_NG``: which rows are real for each channel group
    (None: all). ``weight``, ``bias`` and the running buffers have G*C elements (any shape;
    the buffers are updated in place where the group saw a row). Returns the output (x's
    dtype) and ``seen_G``, which groups saw a row anywhere."""
    N, X = x.shape[:2]
    # statistics in at least float32 (bf16 activations under autocast)
    x_NGCS = x.reshape(N, groups, X // groups, math.prod(x.shape[2:]))
    x_NGCS = x_NGCS.to(torch.promote_types(x.dtype, torch.float32))
    count_GC, mean_GC, m2_GC, centred = _local_moments(x_NGCS, mask_NG)
    if stats.distributed:
        count_GC, mean_GC, m2_GC = stats.combine(count_GC, mean_GC, m2_GC)
        centred = x_NGCS - mean_GC[:, :, None]
    var_GC = m2_GC / count_GC.clamp(min=1)
    scale_GC = torch.rsqrt(var_GC + eps)
    if weight is not None:
        scale_GC = scale_GC * weight.reshape(scale_GC.shape)
    y_NGCS = centred * scale_GC[:, :, None]
    if bias is not None:
        y_NGCS = y_NGCS + bias.reshape(scale_GC.shape)[:, :, None]
    seen_G = count_GC[:, 0] > 0
    if running_mean is not None:
        with torch.no_grad():
            unbiased_GC = var_GC * (count_GC / (count_GC - 1).clamp(min=1))
            seen_G1 = seen_G[:, None]
            for buffer, value in ((running_mean, mean_GC), (running_var, unbiased_GC)):
                view = buffer.view(value.shape)
                view.copy_(torch.where(seen_G1, (1 - momentum) * view + momentum * value, view))
    return y_NGCS.reshape(x.shape).to(x.dtype), seen_G


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state-dict keys) whose training-mode
    statistics are the global batch's once :func:`install_batch_stats` gave it a
    :class:`GroupBatchStats`; with the default :class:`LocalBatchStats` it *is* nn.BatchNorm2d."""

    batch_stats: LocalBatchStats = LocalBatchStats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uses_batch = self.training or self.running_mean is None
        if not (uses_batch and self.batch_stats.distributed):
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        running = self.training and self.running_mean is not None
        y, _ = batch_norm_global(x, 1, None, self.batch_stats, self.weight, self.bias,
                                 self.running_mean if running else None,
                                 self.running_var if running else None, momentum, self.eps)
        return y


def _stats_for(group: dist.ProcessGroup | None, ranks: list[int], rank: int) -> LocalBatchStats:
    if len(ranks) == 1:
        return LocalBatchStats()
    return GroupBatchStats(group, len(ranks), ranks.index(rank))


def _convert(module: nn.Module) -> None:
    """Plain nn.BatchNorm2d children become :class:`BatchNorm2d` holding the same tensors
    (state-dict keys and shapes unchanged); other BatchNorm kinds are refused."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                              child.track_running_stats, device="meta")
            new._parameters, new._buffers = child._parameters, child._buffers
            new.train(child.training)
            setattr(module, name, new)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, BatchNorm2d):
            raise ValueError(f"{type(child).__name__} ({name}) would normalise with per-rank statistics "
                             "under several processes: only BatchNorm2d has global statistics")
        else:
            _convert(child)


def install_batch_stats(model: nn.Module, ctx: ParallelContext, sharded_prefixes: tuple[str, ...]) -> None:
    """Give every BatchNorm of ``model`` the statistics of the global batch (in place).

    BatchNorms under ``sharded_prefixes`` (sharded expert banks) combine over the
    expert-data-parallel group, all others over the world."""
    if not ctx.distributed:
        return
    _convert(model)
    world = _stats_for(ctx.dp_group, list(range(ctx.world_size)), ctx.rank)
    edp = _stats_for(ctx.edp_group, ctx.edp_ranks, ctx.rank)
    for name, module in model.named_modules():
        if hasattr(module, "batch_stats"):
            sharded = bool(sharded_prefixes) and f"{name}.".startswith(sharded_prefixes)
            module.batch_stats = edp if sharded else world
