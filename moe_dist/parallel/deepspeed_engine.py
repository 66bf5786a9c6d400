"""The DeepSpeed engine (``engine: deepspeed``): ZeRO 0-2 around our expert-parallel MoE.

What DeepSpeed supplies (docs/design.md, choice 8): its expert-parallel and expert-data-parallel
groups (``deepspeed.utils.groups``, the same consecutive layout as ``groups.py``), the
expert parameters in optimizer groups of their own
(``split_params_into_different_moe_groups_for_optimizer``: they are marked
``allreduce=False`` with the group name ``ep_size_<n>``), gradient reduction and ZeRO
optimizer-state / gradient sharding. Our dispatcher still moves the samples.

Gradient scaling: DeepSpeed divides every reduced gradient (experts included, since 0.x
"to maintain the gradients value unaffected by ep_size") by the data-parallel world size N,
which is right for a loss that is each rank's *local mean*. Our per-rank loss is its share of
the global loss, so the engine is given ``N * share``: (1/N) * sum_r d(N * share_r) is the
single-process gradient. The tests compare the loss curve with the accelerate engine's.

CPU traps avoided (docs/design.md): the shared-memory op's JIT build (``deepspeed_shm_comm``
disabled before the first ``init_distributed``) and FusedAdam's (a client torch optimizer).

Checkpoints (docs/design.md, choice 6): the optimizer state is saved as the native engine's
(``engine: moe_dist``) ``optimizer.state_dict()`` would hold it for the same model, so either
engine resumes the other's run. DeepSpeed orders and splits the groups differently (the
experts in an ``ep_size_<n>`` group after the gate), and ZeRO 1-2 keeps Adam's moments in
one flat fp32 partition per group and rank, with one ``step`` per partition; DeepSpeed's
tensor-fragment API (``safe_get_full_optimizer_state`` / ``safe_set_full_optimizer_state``)
reads and writes them per parameter. ZeRO 1-2 also steps its own fp32 copy of the weights
(the "master" weights; equal to the module's here, since the engine trains in float32), so
loading weights into the module must refresh that copy.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.errors import ConfigError
from moe_dist.parallel.groups import ParallelContext, check_layout
from moe_dist.parallel.model import moe_modules

__all__ = ["import_deepspeed", "init_deepspeed", "deepspeed_context", "mark_expert_parameters",
           "build_engine", "expert_group_name", "check_zero_stage", "check_even_experts", "NativeGroups",
           "native_optimizer_state", "load_native_optimizer_state", "native_scheduler_state",
           "deepspeed_scheduler_state", "refresh_master_weights"]

#: The native engine's optimizer groups, (name, parameters) in its order: the checkpoint layout.
NativeGroups = Sequence[tuple[str, Sequence[nn.Parameter]]]


def check_zero_stage(zero_stage: int) -> None:
    """ZeRO 0-2 only: DeepSpeed's MoE support stops before ZeRO-3 (docs/design.md)."""
    if zero_stage not in (0, 1, 2):
        raise ConfigError(f"parallel.zero_stage={zero_stage} must be 0, 1 or 2 "
                          "(DeepSpeed's MoE does not support ZeRO-3)")


def check_even_experts(ep_size: int, num_experts: int | None) -> None:
    """engine=deepspeed keeps the even layout (E / ep_size experts per rank): the uneven blocks
    of ``groups.expert_blocks`` are checked against moe_dist's own engine only (README,
    "Several processes"). A one-line ConfigError naming the alternative; no group work."""
    if num_experts is not None and num_experts % ep_size:
        raise ConfigError(f"engine=deepspeed needs moe.num_experts={num_experts} divisible by "
                          f"parallel.ep_size={ep_size}; engine=moe_dist places uneven expert blocks")


def import_deepspeed():
    """``import deepspeed`` with its CPU JIT traps disabled, or a one-line ConfigError."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("engine='deepspeed' needs DeepSpeed: pip install -e '.[deepspeed]'") from None
    major, minor = (int(v) for v in deepspeed.__version__.split(".")[:2])
    if (major, minor) < (0, 19):
        # the gradient scaling below (expert gradients averaged over the whole world) and the
        # engine's MoE detection are those of 0.19
        raise ConfigError(f"engine='deepspeed' needs DeepSpeed >= 0.19, found {deepspeed.__version__}")
    # The first init_distributed otherwise JIT-compiles a shared-memory all-reduce (35-80 s on
    # CPU), even where it is never used (docs/design.md, environment facts).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def init_deepspeed(cpu: bool) -> None:
    """Join (or wrap) the process group through deepspeed.comm; a single process gets a
    world of one, which DeepSpeed needs as well."""
    deepspeed = import_deepspeed()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", auto_mpi_discovery=False)


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def deepspeed_context(ep_size: int, num_experts: int | None) -> ParallelContext:
    """A :class:`ParallelContext` on DeepSpeed's expert-parallel groups (created if needed)."""
    from deepspeed.utils import groups

    world, rank = dist.get_world_size(), dist.get_rank()
    check_layout(world, ep_size, num_experts)
    check_even_experts(ep_size, num_experts)
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    edp_group = groups._get_expert_data_parallel_group(name)
    ctx = ParallelContext(rank=rank, world_size=world, ep_size=ep_size,
                          ep_group=ep_group if ep_size > 1 else None,
                          edp_group=edp_group if world > ep_size else None,
                          ep_ranks=dist.get_process_group_ranks(ep_group),
                          edp_ranks=dist.get_process_group_ranks(edp_group))
    expected = list(range(rank - ctx.ep_rank, rank - ctx.ep_rank + ep_size))
    if ctx.ep_ranks != expected:  # our dispatcher assumes consecutive blocks (groups.py)
        raise RuntimeError(f"DeepSpeed's expert-parallel group {ctx.ep_ranks} is not {expected}")
    return ctx


def mark_expert_parameters(model: nn.Module, ep_size: int) -> None:
    """Tag every MoE's expert parameters as DeepSpeed tags its own experts' (moe/experts.py):
    excluded from the data-parallel all-reduce, reduced over the expert-data-parallel group."""
    for _, moe in moe_modules(model):
        for p in moe.experts.parameters():
            p.allreduce = False
            p.group_name = expert_group_name(ep_size)


def _engine_module(model: nn.Module, ep_size: int) -> nn.Module:
    """``model`` inside a module that also holds a parameter-free stand-in of DeepSpeed's MoE
    class: the engine looks for instances of that class to switch on its expert-parallel
    gradient reduction and ZeRO groups (``has_moe_layers``). Our MoE layers do the work."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertParallelMarker(DeepSpeedMoE):
        def __init__(self, num_experts: int):
            nn.Module.__init__(self)  # no gate, no experts: nothing to train or save
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = expert_group_name(ep_size)

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # deepspeed_context() created the groups

        def forward(self, *args, **kwargs):
            raise RuntimeError("a marker, not a layer")

    class EngineModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.markers = nn.ModuleList(ExpertParallelMarker(m.num_experts) for _, m in moe_modules(model))

        def forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    return EngineModule()


def build_engine(model: nn.Module, build_optimizer: Callable[..., torch.optim.Optimizer],
                 zero_stage: int, ep_size: int) -> tuple[Any, torch.optim.Optimizer, NativeGroups]:
    """``deepspeed.initialize`` with a client torch optimizer (no FusedAdam JIT) whose expert
    parameters sit in their own groups. ``build_optimizer(split_groups=...)`` builds it.
    Returns the engine, the client optimizer (for the LR schedule and checkpoints) and the
    native engine's groups (``split_groups=None``), in which checkpoints hold the state."""
    check_zero_stage(zero_stage)
    deepspeed = import_deepspeed()
    # DeepSpeed 0.19's ZeRO gathers with torch's all_gather_into_tensor, which torch 2.13 marks
    # deprecated: a FutureWarning per gather in the middle of training that a user cannot act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    native = build_optimizer(split_groups=None)  # holds no state: only its groups are kept
    native_groups = [(g["name"], list(g["params"])) for g in native.param_groups]
    mark_expert_parameters(model, ep_size)
    optimizer = build_optimizer(split_groups=split_params_into_different_moe_groups_for_optimizer)
    config = {
        # bookkeeping only: batches come from TensorBatches, one micro-batch per step
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=_engine_module(model, ep_size), optimizer=optimizer,
                                           config=config, dist_init_required=False)
    return engine, optimizer, native_groups


# ----------------------------------------------------------------------------- checkpoints

def _zero_optimizer(engine: Any) -> Any:
    """ZeRO 1-2's optimizer (flat fp32 partitions), or None at stage 0 (the client optimizer
    then steps the parameters themselves)."""
    return engine.optimizer if engine.zero_optimization_stage() > 0 else None


def _deepspeed_groups(engine: Any, optimizer: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
    """The model parameters of each of DeepSpeed's optimizer groups; ZeRO 1-2 replaced a
    group's parameters by its flat fp32 partition and keeps the originals in ``bit16_groups``."""
    zero = _zero_optimizer(engine)
    if zero is not None:
        return [list(params) for params in zero.bit16_groups]
    return [list(g["params"]) for g in optimizer.param_groups]


def _group_index(groups: Sequence[Sequence[nn.Parameter]]) -> dict[int, int]:
    """id(param) -> the index of the group holding it."""
    return {id(p): i for i, params in enumerate(groups) for p in params}


def _link_fragments(zero: Any, optimizer: torch.optim.Optimizer, group: int) -> None:
    """Point the group's per-parameter fragments at its flat partition's optimizer state.
    DeepSpeed 0.19 links them once, right after the *first group's* first step, so every later
    group (the experts') keeps empty fragments and ``safe_get_full_optimizer_state`` raises
    "exp_avg not found"; a state loaded here replaces the tensors they view."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    flat = zero.single_partition_of_fp32_groups[group]
    if optimizer.state.get(flat):
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[group], flat, optimizer.state)


def _param_state(engine: Any, optimizer: torch.optim.Optimizer, group: int, p: nn.Parameter) -> dict[str, Any]:
    """One parameter's optimizer state at this rank's shape (collective under ZeRO 1-2: the
    partitions are summed over the parameter's data-parallel group)."""
    zero = _zero_optimizer(engine)
    if zero is None:
        return dict(optimizer.state.get(p, {}))
    from deepspeed.utils import safe_get_full_optimizer_state

    flat = zero.single_partition_of_fp32_groups[group]
    entry = {}
    for key, value in optimizer.state.get(flat, {}).items():
        if torch.is_tensor(value) and value.shape == flat.shape:
            entry[key] = safe_get_full_optimizer_state(p, key)
        else:  # Adam's step: one per flat partition, i.e. per DeepSpeed group
            entry[key] = value.clone() if torch.is_tensor(value) else value
    return entry


def native_optimizer_state(engine: Any, optimizer: torch.optim.Optimizer,
                           native_groups: NativeGroups) -> dict[str, Any]:
    """DeepSpeed's optimizer state as the native engine's ``optimizer.state_dict()`` holds it
    for this rank's parameters: its group order and names, integer ids in that order, each
    group with the hyperparameters (LR) DeepSpeed steps it with. Collective under ZeRO 1-2."""
    groups = _deepspeed_groups(engine, optimizer)
    group_of = _group_index(groups)
    zero = _zero_optimizer(engine)
    for i in range(len(groups) if zero is not None else 0):
        _link_fragments(zero, optimizer, i)
    state: dict[int, dict[str, Any]] = {}
    param_groups = []
    idx = 0
    for name, params in native_groups:
        hyper = optimizer.param_groups[group_of[id(params[0])]]
        param_groups.append({**{k: v for k, v in hyper.items() if k not in ("params", "moe")}, "name": name,
                             "params": list(range(idx, idx + len(params)))})
        for p in params:
            entry = _param_state(engine, optimizer, group_of[id(p)], p)
            if entry:
                state[idx] = entry
            idx += 1
    return {"state": state, "param_groups": param_groups}


def _check_native_layout(state: dict[str, Any], native_groups: NativeGroups) -> None:
    saved = [(g.get("name"), len(g["params"])) for g in state["param_groups"]]
    expected = [(name, len(params)) for name, params in native_groups]
    if saved != expected:
        raise ValueError(f"the optimizer state holds groups {saved} (name, parameters), expected {expected}")


def _load_partition(zero: Any, optimizer: torch.optim.Optimizer, group: int, params: list[nn.Parameter],
                    entries: dict[int, dict[str, Any]]) -> None:
    """One ZeRO group's flat fp32 state rebuilt from per-parameter entries: each rank writes
    the fragments that fall into its own partition."""
    from deepspeed.utils import safe_set_full_optimizer_state

    saved = [(p, entries[id(p)]) for p in params if id(p) in entries]
    if not saved:
        return
    flat = zero.single_partition_of_fp32_groups[group]
    first_p, first = saved[0]
    per_element = {k for k, v in first.items() if torch.is_tensor(v) and v.shape == first_p.shape}
    scalars = [k for k in first if k not in per_element]
    for p, entry in saved:  # one step per partition: the native engine keeps one per parameter
        if any(not torch.equal(torch.as_tensor(entry[k]), torch.as_tensor(first[k])) for k in scalars):
            raise ValueError(f"ZeRO keeps one optimizer step per group, but the state's parameters of group "
                             f"{group} differ in {scalars}")
    optimizer.state[flat] = {k: torch.zeros_like(flat) if k in per_element else (v.clone() if torch.is_tensor(v) else v)
                             for k, v in first.items()}
    _link_fragments(zero, optimizer, group)
    for p, entry in saved:
        for key in per_element:
            safe_set_full_optimizer_state(p, entry[key].to(flat.device, flat.dtype), key)


def load_native_optimizer_state(engine: Any, optimizer: torch.optim.Optimizer, native_groups: NativeGroups,
                                state: dict[str, Any]) -> None:
    """Load a state in :func:`native_optimizer_state`'s form (this rank's shapes; written by
    either engine) into DeepSpeed's optimizer: moments, steps and group hyperparameters."""
    _check_native_layout(state, native_groups)
    groups = _deepspeed_groups(engine, optimizer)
    native_params = [p for _, params in native_groups for p in params]
    native_group_of = _group_index([params for _, params in native_groups])
    entries = {id(native_params[int(idx)]): entry for idx, entry in state["state"].items()}
    for i, params in enumerate(groups):
        saved = state["param_groups"][native_group_of[id(params[0])]]
        optimizer.param_groups[i].update({k: v for k, v in saved.items() if k not in ("params", "name", "moe")})
    zero = _zero_optimizer(engine)
    if zero is not None:
        for i, params in enumerate(groups):
            _load_partition(zero, optimizer, i, params, entries)
        return
    for p in native_params:  # stage 0: the client optimizer's own per-parameter state
        optimizer.state.pop(p, None)
        if id(p) in entries:
            optimizer.state[p] = {k: v.to(p.device, p.dtype) if torch.is_tensor(v) and v.shape == p.shape else v
                                  for k, v in entries[id(p)].items()}


# A torch LR scheduler keeps these lists with one value per optimizer group.
PER_GROUP_SCHEDULER_KEYS = ("base_lrs", "_last_lr")


def _reorder_groups(state: dict[str, Any], source_of: list[int]) -> dict[str, Any]:
    return {k: [v[i] for i in source_of] if k in PER_GROUP_SCHEDULER_KEYS else v for k, v in state.items()}


def native_scheduler_state(state: dict[str, Any], engine: Any, optimizer: torch.optim.Optimizer,
                           native_groups: NativeGroups) -> dict[str, Any]:
    """A scheduler's ``state_dict()`` over DeepSpeed's groups, its per-group lists in the
    native engine's group order."""
    group_of = _group_index(_deepspeed_groups(engine, optimizer))
    return _reorder_groups(state, [group_of[id(params[0])] for _, params in native_groups])


def deepspeed_scheduler_state(state: dict[str, Any], engine: Any, optimizer: torch.optim.Optimizer,
                              native_groups: NativeGroups) -> dict[str, Any]:
    """The inverse of :func:`native_scheduler_state`."""
    native_group_of = _group_index([params for _, params in native_groups])
    return _reorder_groups(state, [native_group_of[id(params[0])] for params in _deepspeed_groups(engine, optimizer)])


def refresh_master_weights(engine: Any) -> None:
    """After weights were loaded into the module: ZeRO 1-2 steps its fp32 partitions and
    copies them back into the module, so without this the first step undoes the load."""
    zero = _zero_optimizer(engine)
    if zero is not None:
        zero.refresh_fp32_params()
