"""The one place that knows about ranks (docs/design.md, choices 3-6).

* ``comm``: the named collectives the rest of moe_dist asks for (``all_reduce``, ...);
  no-ops in one process.
* ``env``: process discovery (torchrun, accelerate, deepspeed, SLURM, MPI variables),
  joining and leaving the process group (with its collective timeout), ``is_main()``.
* ``failure``: a collective that timed out or lost a rank, as one line naming it.
* ``groups``: :class:`ParallelContext`, the expert-parallel and expert-data-parallel groups.
* ``collectives``: all-reduce, variable-size all-gather and all-to-all with exact adjoints.
* ``dispatch``: the MoE's dispatchers (local; expert-parallel all-to-all for dense, top-k and
  attentive routing) and the global-batch gate losses.
* ``model``: :func:`parallelize` (keep this rank's experts), replicated vs sharded parameters.
* ``batchnorm``: BatchNorm with the global batch's statistics (installed by ``parallelize``).
* ``grads``: :class:`GradientReducer`, gradient sums over the right groups (no DDP).
* ``state``: checkpoints in the single-process layout, loadable at any ep_size.
* ``traffic``: bytes each collective sends to other ranks, by kind (a run's
  ``comm_bytes_per_step``).
"""

from moe_dist.parallel.comm import (agree_max_int, all_gather_floats, all_reduce, group_exists, is_distributed, rank,
                                    same_on_every_rank, world_size)
from moe_dist.parallel.dispatch import BatchLayout, ExpertParallelDispatch, LocalDispatch
from moe_dist.parallel.env import (WorldInfo, barrier, destroy_distributed, group_timeout, init_distributed, is_main,
                                   join_process_group, process_group, world_info_from_env)
from moe_dist.parallel import traffic
from moe_dist.parallel.failure import collective_failure
from moe_dist.parallel.grads import GradientReducer, all_reduce_gradients
from moe_dist.parallel.groups import ParallelContext, check_layout
from moe_dist.parallel.model import moe_modules, parallelize, split_parameters
from moe_dist.parallel.state import (full_model_state, full_optimizer_state, load_full_model_state,
                                     load_full_optimizer_state, slice_model_state)

__all__ = [
    "agree_max_int", "all_gather_floats", "all_reduce", "group_exists", "is_distributed", "rank", "same_on_every_rank",
    "world_size",
    "BatchLayout", "LocalDispatch", "ExpertParallelDispatch",
    "WorldInfo", "world_info_from_env", "init_distributed", "join_process_group", "destroy_distributed", "is_main",
    "process_group", "barrier", "group_timeout", "collective_failure",
    "GradientReducer", "all_reduce_gradients",
    "ParallelContext", "check_layout",
    "moe_modules", "parallelize", "split_parameters", "traffic",
    "full_model_state", "full_optimizer_state", "load_full_model_state",
    "load_full_optimizer_state", "slice_model_state",
]
