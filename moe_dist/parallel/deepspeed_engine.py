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
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.errors import ConfigError
from moe_dist.parallel.groups import ParallelContext, check_layout
from moe_dist.parallel.model import moe_modules

__all__ = ["import_deepspeed", "init_deepspeed", "deepspeed_context", "mark_expert_parameters",
           "build_engine", "expert_group_name", "check_zero_stage", "check_even_experts"]


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
                 zero_stage: int, ep_size: int) -> tuple[Any, torch.optim.Optimizer]:
    """``deepspeed.initialize`` with a client torch optimizer (no FusedAdam JIT) whose expert
    parameters sit in their own groups. ``build_optimizer(split_groups=...)`` builds it.
    Returns the engine and the client optimizer (for the LR schedule and checkpoints)."""
    check_zero_stage(zero_stage)
    deepspeed = import_deepspeed()
    # DeepSpeed 0.19's ZeRO gathers with torch's all_gather_into_tensor, which torch 2.13 marks
    # deprecated: a FutureWarning per gather in the middle of training that a user cannot act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

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
    return engine, optimizer
