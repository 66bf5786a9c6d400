"""Checkpoint state independent of the parallel layout (docs/design.md, choice 6).

A saved model or optimizer state always has the single-process layout: every expert-bank
tensor holds all E experts along dim 0, expert e at index e (its global id). On save, each
sharded tensor is all-gathered over the expert-parallel group, whose ranks hold contiguous
blocks of global ids in rank order, blocks that may differ in size by one
(``groups.expert_blocks``; hence the variable-size gather of ``collectives``); on load, each
rank slices its own ids. A run saved at any ep_size loads at any other, and in one process.
(A torchtitan-derived project wrote every rank's renumbered *local* keys, so experts came
back under the wrong ids; the tests here use experts with distinct weights to catch exactly
that.)

Replicated tensors are the same on every rank and are taken from the local copy.
Every function here is collective over the world when ep_size > 1: call it on all ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_dist.parallel import collectives as coll
from moe_dist.parallel.groups import ParallelContext
from moe_dist.parallel.model import moe_modules, placement_unit, sharded_prefixes

__all__ = ["full_model_state", "load_full_model_state", "full_optimizer_state",
           "load_full_optimizer_state", "slice_model_state", "gather_optimizer_state", "slice_optimizer_state"]


def _gather_experts(t: torch.Tensor, ctx: ParallelContext, blocks: list[range]) -> torch.Tensor:
    """This rank's block of an expert tensor -> all E experts, in global id order."""
    return coll.all_gather_rows(t.detach(), [len(b) for b in blocks], ctx.ep_rank, ctx.ep_group)


def _blocks(model: nn.Module, ctx: ParallelContext) -> dict[str, list[range]]:
    """prefix -> every EP rank's global expert ids, for every sharded bank."""
    prefixes = sharded_prefixes(model, ctx)
    return {p: ctx.expert_blocks(m.num_experts, placement_unit(m))
            for p, (_, m) in zip(prefixes, moe_modules(model))}


def _local_range(model: nn.Module, ctx: ParallelContext) -> dict[str, range]:
    """prefix -> the global expert ids this rank holds, for every sharded bank."""
    return {p: blocks[ctx.ep_rank] for p, blocks in _blocks(model, ctx).items()}


def _expert_count(model: nn.Module, ctx: ParallelContext) -> dict[str, int]:
    """prefix -> E of the bank, for every sharded bank."""
    return {p: blocks[-1].stop for p, blocks in _blocks(model, ctx).items()}


def full_model_state(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with all E experts in every expert tensor (global id order)."""
    state = model.state_dict()
    blocks = _blocks(model, ctx)
    if not blocks:
        return state
    out = {}
    for k, v in state.items():
        prefix = next((p for p in blocks if k.startswith(p)), None)
        out[k] = v if prefix is None else _gather_experts(v, ctx, blocks[prefix])
    return out


def slice_model_state(model: nn.Module, state: dict[str, torch.Tensor],
                      ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """A full-layout state dict cut down to this rank's experts."""
    ranges, totals = _local_range(model, ctx), _expert_count(model, ctx)
    if not ranges:
        return dict(state)
    out = {}
    for k, v in state.items():
        prefix = next((p for p in ranges if k.startswith(p)), None)
        if prefix is not None:
            mine, full = ranges[prefix], totals[prefix]
            if v.shape[0] != full:
                raise ValueError(f"{k} holds {v.shape[0]} experts, expected {full} (a full-layout state)")
            v = v[mine.start:mine.stop]
        out[k] = v
    return out


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], ctx: ParallelContext,
                          strict: bool = True):
    """Load a full-layout state dict (any ep_size it was saved at) into this rank's part."""
    return model.load_state_dict(slice_model_state(model, state, ctx), strict=strict)


def _param_order(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Parameters in the order of ``optimizer.state_dict()``'s integer ids."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _sharded_params(model: nn.Module, ctx: ParallelContext) -> dict[int, list[range]]:
    """id(param) -> every EP rank's global expert ids, for sharded parameters."""
    blocks = _blocks(model, ctx)
    out = {}
    for name, p in model.named_parameters():
        for prefix, ranks_blocks in blocks.items():
            if name.startswith(prefix):
                out[id(p)] = ranks_blocks
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                         ctx: ParallelContext) -> dict[str, Any]:
    """``optimizer.state_dict()`` with the per-parameter tensors of sharded parameters
    (Adam's moments, momentum buffers) gathered to all E experts."""
    return gather_optimizer_state(optimizer.state_dict(), _param_order(optimizer), model, ctx)


def gather_optimizer_state(state: dict[str, Any], params: list[nn.Parameter], model: nn.Module,
                           ctx: ParallelContext) -> dict[str, Any]:
    """A state in ``optimizer.state_dict()`` form whose integer ids index ``params`` (this
    rank's parameters), with the per-parameter tensors of sharded parameters gathered to all
    E experts. Engines that keep the state elsewhere (DeepSpeed's ZeRO partitions) build
    that form first."""
    sharded = _sharded_params(model, ctx)
    if not sharded:
        return state
    new_state = {}
    for idx in sorted(state["state"]):
        entry = state["state"][idx]
        p = params[idx]
        if id(p) in sharded:
            blocks = sharded[id(p)]
            entry = {k: _gather_experts(v, ctx, blocks) if torch.is_tensor(v) and v.shape == p.shape else v
                     for k, v in entry.items()}
        new_state[idx] = entry
    return {"state": new_state, "param_groups": state["param_groups"]}


def slice_optimizer_state(state: dict[str, Any], params: list[nn.Parameter], model: nn.Module,
                          ctx: ParallelContext) -> dict[str, Any]:
    """A full-layout optimizer state cut down to this rank's experts; its integer ids index
    ``params``."""
    sharded = _sharded_params(model, ctx)
    if not sharded:
        return state
    new_state = {}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        if id(p) in sharded:
            blocks = sharded[id(p)]
            mine = blocks[ctx.ep_rank]
            full_shape = (blocks[-1].stop,) + tuple(p.shape[1:])
            entry = {k: v[mine.start:mine.stop] if torch.is_tensor(v) and tuple(v.shape) == full_shape else v
                     for k, v in entry.items()}
        new_state[idx] = entry
    return {"state": new_state, "param_groups": state["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                              state: dict[str, Any], ctx: ParallelContext) -> None:
    """Load a full-layout optimizer state into this rank's optimizer (slicing the experts)."""
    optimizer.load_state_dict(slice_optimizer_state(state, _param_order(optimizer), model, ctx))
