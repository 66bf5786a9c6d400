"""Sharding a model's experts over the expert-parallel group, and which parameters are whose.

:func:`parallelize` turns a model built identically on every rank (same seed, all E experts:
expert e starts with the weights it has in a single-process run) into this rank's part:
each MoE keeps its replicated gate and the experts ``ctx.local_experts(E)``, and gets an
:class:`~moe_dist.parallel.dispatch.ExpertParallelDispatch`.

After it, parameters are of two kinds (docs/design.md, choice 5):

* *sharded* (``experts.*`` of a MoE when ep_size > 1): each rank holds a different slice;
  gradients are summed over the expert-data-parallel group;
* *replicated* (gate, attention, a single model, experts when ep_size == 1): gradients are
  summed over all ranks.

BatchNorm statistics follow the same split: a replicated module's are combined over the
world, a sharded bank's over its expert-data-parallel group (``batchnorm``).
"""

from __future__ import annotations

from torch import nn

from moe_dist.parallel.batchnorm import install_batch_stats
from moe_dist.parallel.dispatch import ExpertParallelDispatch
from moe_dist.parallel.groups import ParallelContext, check_layout

__all__ = ["moe_modules", "parallelize", "placement_unit", "sharded_prefixes", "split_parameters"]


def moe_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MoE layer: modules with an expert bank and a dispatcher."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "dispatcher") and isinstance(getattr(m, "experts", None), nn.Module)]


def placement_unit(moe: nn.Module) -> int:
    """Experts of ``moe`` that must share a rank: its group size under hierarchical routing
    (so a sample routed to one group travels to one rank), else 1."""
    return int(getattr(moe, "placement_unit", 1))


def parallelize(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Keep this rank's experts and attach the expert-parallel dispatcher (in place).

    Every BatchNorm then normalises with the global batch's statistics
    (:mod:`moe_dist.parallel.batchnorm`). A no-op for a single process. A model without MoE
    layers (model.kind=single) is plain data parallel: nothing to shard.
    """
    if not ctx.distributed:
        return model
    for _, moe in moe_modules(model):
        E = moe.num_experts
        check_layout(ctx.world_size, ctx.ep_size, E)
        if ctx.ep_size > 1:
            bank = moe.experts
            mine = ctx.local_experts(E, placement_unit(moe))
            if bank.num_experts != E:
                raise ValueError(f"the expert bank holds {bank.num_experts} experts, expected all {E}: "
                                 "parallelize a freshly built model once")
            moe.experts = type(bank).from_modules(bank.to_modules()[mine.start:mine.stop])
        moe.dispatcher = ExpertParallelDispatch(ctx, E, placement_unit(moe))
    install_batch_stats(model, ctx, sharded_prefixes(model, ctx))
    return model


def sharded_prefixes(model: nn.Module, ctx: ParallelContext) -> tuple[str, ...]:
    """State-dict prefixes of the sharded expert banks (empty unless ep_size > 1)."""
    if ctx.ep_size == 1:
        return ()
    return tuple(f"{name}.experts." if name else "experts." for name, _ in moe_modules(model))


def split_parameters(model: nn.Module, ctx: ParallelContext) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, sharded) parameters, each in ``named_parameters`` order (the same on
    every rank, so that flattened collectives line up)."""
    prefixes = sharded_prefixes(model, ctx)
    replicated, sharded = [], []
    for name, p in model.named_parameters():
        (sharded if prefixes and name.startswith(prefixes) else replicated).append(p)
    return replicated, sharded
