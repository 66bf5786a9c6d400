"""``build_trainer(cfg)``: process state, data, model and engine, in that order.

Everything that reads the config to *make* something lives here; the Trainer only stores
what it is given and trains. Order matters for reproducibility: the model is built right
after ``torch.manual_seed(cfg.seed)``, so a run's initial weights depend on its seed alone
(and every rank builds all E experts alike before keeping its own).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_dist.config import Config, routing_groups
from moe_dist.data import Dataset, Split, TensorBatches, load_dataset
from moe_dist.errors import CheckpointError, ConfigError
from moe_dist.models import build_model
from moe_dist.models.parts import PART_PREFIXES
from moe_dist.parallel import ParallelContext, group_exists, join_process_group, parallelize, world_size
from moe_dist.rundir import RunDir
from moe_dist.train.engines import build_engine
from moe_dist.train.optim import build_optimizer, build_scheduler
from moe_dist.train.process import choose_device, configure_process, process_group_backend, runs_on_cpu
from moe_dist.train.trainer import Trainer

__all__ = ["RunData", "build_trainer", "evaluate_run", "load_data", "build_run_data", "build_network", "init_from"]

@dataclass
class RunData:
    """A run's data on its device: the splits and this rank's batches of them."""

    dataset: Dataset
    train: Split  # after data.classes selection
    test: Split
    train_batches: Any  # TensorBatches, or shard batches for data.format=webdataset
    eval_batches: TensorBatches

    @property
    def num_clusters(self) -> int:
        """Clusters of Chen et al.'s synthetic data (dispatch entropy), 0 elsewhere."""
        return int(self.train.cluster.max()) + 1 if self.train.cluster is not None else 0


def load_data(cfg: Config) -> Dataset:
    """The dataset ``cfg.data`` names: files read into memory, or a shard folder (training
    streamed, test split in memory)."""
    d = cfg.data
    if d.format == "webdataset":
        from moe_dist.data.shards import load_shards

        return load_shards(d.root, d.name, normalization=d.normalization, setting=d.setting,
                           data_seed=d.data_seed, num_workers=d.num_workers)
    return load_dataset(d.name, d.root, setting=d.setting, data_seed=None if d.data_seed < 0 else d.data_seed,
                        train_size=d.train_size, test_size=d.test_size, normalization=d.normalization)


def build_run_data(cfg: Config, dataset: Dataset, ctx: ParallelContext, device: torch.device) -> RunData:
    """Splits moved to ``device`` (datasets this small stay resident: no loader workers) and
    this rank's share of every global batch."""
    from moe_dist.data.shards import ShardSplit

    train, test = dataset.train, dataset.test
    if cfg.data.classes:
        train, test = (s.select_classes(cfg.data.classes) for s in (train, test))
    train, test = train.to(device), test.to(device)
    share = {"rank": ctx.rank, "world_size": ctx.world_size}
    batch = cfg.train.batch_size or len(train)
    if isinstance(train, ShardSplit):  # resampled shards, len(train_batches) per epoch on every rank
        train_batches = train.batches(batch, seed=cfg.seed, **share)
    else:
        train_batches = TensorBatches(train, batch, shuffle=True, seed=cfg.seed, **share)
    eval_batches = TensorBatches(test, cfg.train.eval_batch_size, shuffle=False, seed=0, **share)
    return RunData(dataset, train, test, train_batches, eval_batches)


def init_from(model: nn.Module, run_dir: str, parts: list[str]) -> None:
    """Initialise ``parts`` of ``model`` from another run's latest weights (distillation,
    pretrained experts/gate). Parameters are matched by name; names absent from the source
    (a new softmax gate's output layer) keep their fresh initialisation, as in the paper's
    strict=False copy (docs/papers.md A.8)."""
    payload = RunDir(run_dir).load_checkpoint()
    if payload is None:
        raise CheckpointError(f"train.init_from={run_dir} has no checkpoint in {run_dir}/checkpoints")
    wanted = tuple(p for part in parts for p in PART_PREFIXES[part])
    source = {k: v for k, v in payload["model"].items() if k.startswith(wanted)}
    target = model.state_dict()
    for name, tensor in source.items():
        if name in target and target[name].shape != tensor.shape:
            raise CheckpointError(f"train.init_from: {name} has shape {tuple(tensor.shape)} in "
                                  f"{run_dir} but {tuple(target[name].shape)} here")
    model.load_state_dict({k: v for k, v in source.items() if k in target}, strict=False)


def build_network(cfg: Config, dataset: Dataset, ctx: ParallelContext, init: bool = True) -> nn.Module:
    """The model of ``cfg`` from seed ``cfg.seed``, initialised from ``train.init_from`` if set
    (and ``init``), keeping this rank's experts (expert e has the initial weights it has in
    one process)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.moe, cfg.loss, dataset.num_classes, dataset.input_shape)
    if cfg.train.init_from and init:
        init_from(model, cfg.train.init_from, cfg.train.init_parts)
    return parallelize(model, ctx)


def _parallel_context(cfg: Config, cpu: bool) -> ParallelContext:
    """The expert-parallel layout; DeepSpeed's own groups for engine=deepspeed. One process
    holds every expert whatever parallel.ep_size says: checkpoints do not depend on the
    layout, so a run trained at any ep_size evaluates and resumes in one process."""
    ep_size = cfg.parallel.ep_size if world_size() > 1 else 1
    num_experts = cfg.moe.num_experts if cfg.model.kind == "moe" else None
    if cfg.engine == "deepspeed":
        from moe_dist.parallel.deepspeed_engine import check_even_experts, deepspeed_context, init_deepspeed

        if cfg.train.mixed_precision != "no":
            raise ConfigError("engine='deepspeed' runs in float32 here (its bf16/fp16 modes cast the "
                              "gate too); use train.mixed_precision=no or engine=moe_dist")
        check_even_experts(ep_size, num_experts)  # before DeepSpeed builds any group
        init_deepspeed(cpu)
        return deepspeed_context(ep_size, num_experts)
    return ParallelContext.create(ep_size, num_experts)


def evaluate_run(run: RunDir, split: str = "test") -> tuple[Config, dict[str, Any]]:
    """``moe-dist eval``: the metrics of a run folder's latest weights over its whole test
    (or training) split, in this process; no trainer, optimizer or process group."""
    from moe_dist.train.engines import mixed_precision_autocast
    from moe_dist.train.evaluate import evaluate

    cfg = run.read_config()
    weights = run.latest_weights()
    configure_process(cfg)
    device, ctx = choose_device(cfg), ParallelContext.local()
    data = build_run_data(cfg, load_data(cfg), ctx, device)
    model = build_network(cfg, data.dataset, ctx, init=False).to(device)
    model.load_state_dict(weights)
    batches = data.eval_batches if split == "test" else TensorBatches(data.train, cfg.train.eval_batch_size,
                                                                      shuffle=False, seed=0)
    num_experts = cfg.moe.num_experts if cfg.model.kind == "moe" else 0
    return cfg, evaluate(model, batches, data.dataset.num_classes, num_experts=num_experts,
                         num_clusters=data.num_clusters, num_groups=routing_groups(cfg) or 0, loss_kind=cfg.loss.kind,
                         autocast=lambda: mixed_precision_autocast(cfg.train.mixed_precision, device))


def build_trainer(cfg: Config, dataset: Dataset | None = None) -> Trainer:
    """A Trainer for ``cfg``: joins the launcher's process group (left again by
    ``Trainer.close`` if this call joined it), then data, model and engine. ``dataset``
    replaces loading ``cfg.data`` (procedures that share one dataset between runs)."""
    started = time.perf_counter()
    configure_process(cfg)
    existed = group_exists()
    join_process_group(process_group_backend(cfg), cfg.parallel.timeout_s)
    ctx = _parallel_context(cfg, runs_on_cpu(cfg))  # DeepSpeed makes a group even for one process
    owns_group = not existed and group_exists()
    device = choose_device(cfg)
    data = build_run_data(cfg, dataset if dataset is not None else load_data(cfg), ctx, device)
    model = build_network(cfg, data.dataset, ctx)
    engine = build_engine(cfg, model, ctx, device, lambda m, split=None: build_optimizer(m, cfg, split))
    scheduler = build_scheduler(engine.optimizer, cfg)
    return Trainer(cfg, RunDir(cfg.run_dir), engine, data, scheduler, owns_process_group=owns_group,
                   started=started)
