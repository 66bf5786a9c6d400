"""The training loop: ``fit`` schedules (evaluation, logging, checkpoints); ``train_step`` computes.

Multi-process runs (torchrun, ``accelerate launch``, SLURM; design.md choices 3-7): the
global batch ``train.batch_size`` is the unit. Each rank takes its contiguous share of every
global batch, in the single-process order; its loss is its *share* of the global-batch loss
(NLL summed over its samples / global batch size, plus its share of the gate losses, which
``moe_dist.parallel`` reduces over the global batch), and gradients are summed by
:class:`~moe_dist.parallel.GradientReducer` (no DDP: experts are sharded over
``parallel.ep_size`` ranks). N ranks thus follow the single-process trajectory. Only rank 0
writes files; checkpoints hold all experts by global id (any ep_size can resume them);
evaluation counts are all-reduced once.

Legend: B = batch (this rank's share), G = global batch, C = classes, E = experts,
K = clusters (synthetic data).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# accelerate imports deepspeed when it is installed, and deepspeed then logs an accelerator
# detection warning on stdout (breaking `moe-dist eval --json`) unless it is told the
# accelerator; without CUDA that is the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary
from tqdm.auto import tqdm

from moe_dist import losses
from moe_dist.config import Config, from_dict, save_config, to_dict
from moe_dist.data import Dataset, Split, TensorBatches, load_dataset
from moe_dist.data.augment import cifar_augment
from moe_dist.data.shards import ShardSplit, load_shards
from moe_dist.errors import CheckpointError, ConfigError
from moe_dist.metrics import EvalAccumulator, dispatch_entropy
from moe_dist.models import build_model
from moe_dist.parallel import (GradientReducer, ParallelContext, destroy_distributed, full_model_state,
                               full_optimizer_state, init_distributed, load_full_model_state,
                               load_full_optimizer_state, parallelize)
from moe_dist.parallel.deepspeed_engine import build_engine, deepspeed_context, init_deepspeed
from moe_dist.plots import selection_heatmap
from moe_dist.train.checkpoint import load_checkpoint, save_checkpoint
from moe_dist.train.optim import build_optimizer, build_scheduler
from moe_dist.train.preemption import Preempted, PreemptionFlag

# Keys that may differ between a run and its resumption: extending a run is allowed.
RESUMABLE_CHANGES = {"train.epochs", "train.progress", "train.num_threads", "train.eval_every",
                     "parallel.ep_size"}  # checkpoints are independent of the expert layout


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    min_loss: float = math.inf  # for Chen et al.'s early stopping (paper-spec B.3)
    stopped_early: int = -1  # epoch at which early stopping fired, -1 if never
    wall_seconds: float = 0.0  # training time summed over all sessions of the run
    history: list[dict[str, Any]] = field(default_factory=list)
    # A run preempted mid-epoch (moe_dist.train.preemption) resumes epoch `epoch` at batch
    # `batch` with the running sums of the batches before it (Trainer._keep_partial_epoch).
    batch: int = 0
    partial: dict[str, Any] = field(default_factory=dict)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: Config, b: Config) -> list[str]:
    fa, fb = _flatten(to_dict(a)), _flatten(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def runs_on_cpu(cfg: Config) -> bool:
    """Whether ``cfg`` trains on the CPU (its processes then join a gloo group)."""
    return cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())


def process_group_backend(cfg: Config) -> str | None:
    """The backend a run of ``cfg`` joins the launcher's group with: gloo on CPU, else
    init_distributed's default (NCCL for CUDA tensors, gloo for CPU ones)."""
    return "gloo" if runs_on_cpu(cfg) else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"


def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} CPU"


class Trainer:
    """Builds data, model and optimizer from a Config and trains with resumption."""

    def __init__(self, cfg: Config, dataset: Dataset | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if cfg.train.deterministic:
            # cuBLAS reads this when it creates its handle, i.e. at the first matrix product
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        cpu = runs_on_cpu(cfg)
        if cfg.train.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is available")
        # Joins the launcher's process group (torchrun, accelerate, SLURM) before accelerate
        # looks for one; a no-op in a single process. fit() leaves a group it created.
        self._owns_process_group = not dist.is_initialized()
        init_distributed(process_group_backend(cfg))
        self.use_deepspeed = cfg.engine == "deepspeed"
        if self.use_deepspeed:
            if cfg.train.mixed_precision != "no":
                raise ConfigError("engine='deepspeed' runs in float32 here (its bf16/fp16 modes cast the "
                                  "gate too); use train.mixed_precision=no or engine=accelerate")
            init_deepspeed(cpu)
        self._owns_process_group &= dist.is_initialized()
        # accelerate keeps one process-wide state and refuses a second Accelerator with another
        # precision; procedures (study, distill, tests) build several trainers in one process.
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision)
        self.device = self.accelerator.device
        # One process holds every expert whatever parallel.ep_size says: checkpoints do not
        # depend on the layout, so a run trained at any ep_size evaluates and resumes here.
        ep_size = cfg.parallel.ep_size if dist.is_initialized() and dist.get_world_size() > 1 else 1
        num_experts = cfg.moe.num_experts if cfg.model.kind == "moe" else None
        self.ctx = (deepspeed_context(ep_size, num_experts) if self.use_deepspeed
                    else ParallelContext.create(ep_size, num_experts))
        self.is_main = self.ctx.is_main
        if self.ctx.distributed and cfg.train.mixed_precision == "fp16":
            raise ConfigError("train.mixed_precision='fp16' is not supported with several processes "
                              "(per-rank loss scaling would desynchronise the ranks); use bf16")

        if dataset is None and cfg.data.format == "webdataset":  # streamed train split, test split in memory
            dataset = load_shards(cfg.data.root, cfg.data.name, normalization=cfg.data.normalization,
                                  setting=cfg.data.setting, data_seed=cfg.data.data_seed,
                                  num_workers=cfg.data.num_workers)
        self.data = dataset if dataset is not None else load_dataset(
            cfg.data.name, cfg.data.root, setting=cfg.data.setting,
            data_seed=None if cfg.data.data_seed < 0 else cfg.data.data_seed,
            train_size=cfg.data.train_size, test_size=cfg.data.test_size,
            normalization=cfg.data.normalization)
        train_split, test_split = self.data.train, self.data.test
        if cfg.data.classes:
            train_split, test_split = (s.select_classes(cfg.data.classes) for s in (train_split, test_split))
        # Datasets this small stay resident on the training device (no loader workers).
        self.train_split = train_split.to(self.device)
        self.test_split = test_split.to(self.device)
        batch = cfg.train.batch_size or len(self.train_split)
        share = {"rank": self.ctx.rank, "world_size": self.ctx.world_size}
        self.train_batches = TensorBatches(self.train_split, batch, shuffle=True, seed=cfg.seed, **share)
        self.eval_batches = TensorBatches(self.test_split, cfg.train.eval_batch_size, shuffle=False, seed=0,
                                          **share)
        if isinstance(self.train_split, ShardSplit):  # resampled shards, len(train_batches) per epoch on every rank
            self.train_batches = self.train_split.batches(batch, seed=cfg.seed, **share)

        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, cfg.moe, cfg.loss, self.data.num_classes, self.data.input_shape)
        if cfg.train.init_from:
            self._init_from(model, cfg.train.init_from)
        # Every rank built all E experts from the same seed; keep this rank's (expert e has
        # the initial weights it has in a single-process run).
        self.model = parallelize(model, self.ctx).to(self.device)
        self.module = self.model  # the model itself, whatever wraps it
        self.engine = None
        if self.use_deepspeed:
            # DeepSpeed reduces the gradients (its expert groups) and shards the optimizer.
            self.engine, self.optimizer = build_engine(
                self.model, lambda split_groups: build_optimizer(self.module, cfg, split_groups),
                cfg.parallel.zero_stage, ep_size)
            self.model = self.engine
        elif self.ctx.distributed:
            optimizer = build_optimizer(self.model, cfg)
            # No accelerate.prepare: it would wrap the model in DDP, which all-reduces the
            # sharded experts across the expert-parallel group. Gradients are summed here.
            self.optimizer = optimizer
            self.reduce_gradients = GradientReducer(self.model, self.ctx)
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.model, build_optimizer(self.model, cfg))
            self.module = self.accelerator.unwrap_model(self.model)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.state = TrainState()
        self.preemption = PreemptionFlag()  # installed while fit() runs
        self.is_moe = cfg.model.kind == "moe"
        self.num_experts = cfg.moe.num_experts if self.is_moe else 0
        self.num_clusters = int(self.train_split.cluster.max()) + 1 if self.train_split.cluster is not None else 0
        self.writer: SummaryWriter | None = None
        self.bar: tqdm | None = None
        self.step_seconds_by_rank: list[float] = []  # the last epoch's mean step time of every rank

    # ----------------------------------------------------------------------------- set-up
    def _init_from(self, model: torch.nn.Module, run_dir: str) -> None:
        """Initialise from another run's latest weights (distillation, pretrained experts/gate).

        Parameters are matched by name; names absent from the source (a new softmax gate's
        output layer) keep their fresh initialisation, as in the paper's strict=False copy (A.8).
        """
        payload = load_checkpoint(Path(run_dir) / "checkpoints")
        if payload is None:
            raise CheckpointError(f"train.init_from={run_dir} has no checkpoint in {run_dir}/checkpoints")
        prefixes = {"experts": ("experts.", "expert."), "gate": ("gate.", "attention.")}
        wanted = tuple(p for part in self.cfg.train.init_parts for p in prefixes[part])
        source = {k: v for k, v in payload["model"].items() if k.startswith(wanted)}
        target = model.state_dict()
        for name, tensor in source.items():
            if name in target and target[name].shape != tensor.shape:
                raise CheckpointError(f"train.init_from: {name} has shape {tuple(tensor.shape)} in "
                                      f"{run_dir} but {tuple(target[name].shape)} here")
        model.load_state_dict({k: v for k, v in source.items() if k in target}, strict=False)

    def _resume(self) -> None:
        # Loaded on the CPU whatever the device: the RNG states must stay CPU ByteTensors
        # (torch.set_rng_state rejects a CUDA tensor), and load_state_dict copies weights and
        # optimizer moments to their parameters' device.
        payload = load_checkpoint(self.ckpt_dir, map_location="cpu")
        if payload is None:
            return
        saved = from_dict(payload["config"])
        diff = [k for k in config_differences(saved, self.cfg) if k not in RESUMABLE_CHANGES]
        if diff:
            raise ConfigError(f"{self.run_dir} holds a run with a different config ({', '.join(diff)}); "
                              "use a new run_dir or the same settings to resume")
        self.load_model_state(payload["model"])
        if payload["optimizer"]:
            load_full_optimizer_state(self.optimizer, self.module, payload["optimizer"], self.ctx)
        elif self.is_main:
            print(f"{self.run_dir}: the checkpoint holds no optimizer state (DeepSpeed ZeRO >= 1); "
                  "optimizer moments restart")
        self.scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["rng_cpu"])
        if torch.cuda.is_available() and payload.get("rng_cuda") is not None:
            torch.cuda.set_rng_state_all(payload["rng_cuda"])
        self.state = TrainState(**json.loads(payload["state"]))
        if self.is_main:
            within = f", batch {self.state.batch}" if self.state.batch else ""
            print(f"resumed {self.run_dir} at epoch {self.state.epoch}{within}")

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load full-layout weights (a checkpoint's ``model``, any ep_size) into this rank's part."""
        load_full_model_state(self.module, state, self.ctx)

    def _checkpoint(self) -> None:
        # Collective when experts are sharded: every rank gathers, rank 0 writes.
        model = self.module
        model_state = full_model_state(model, self.ctx)
        # ZeRO 1-2 partitions the optimizer state over ranks in its own flat layout: not saved
        # (the weights are; a resumed run restarts the moments).
        zero_sharded = self.use_deepspeed and self.cfg.parallel.zero_stage > 0
        optimizer_state = {} if zero_sharded else full_optimizer_state(self.optimizer, model, self.ctx)
        if not self.is_main:
            return
        payload = {
            "config": to_dict(self.cfg),
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            # JSON keeps the state loadable with weights_only=True (no custom classes, no inf).
            "state": json.dumps(self.state.__dict__),
        }
        save_checkpoint(self.ckpt_dir, self.state.epoch, payload, keep=self.cfg.train.keep_checkpoints,
                        step=self.state.step if self.state.batch else None)

    # ----------------------------------------------------------------------------- compute
    def compute_loss(self, out, y_B: torch.Tensor,
                     global_batch: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its parts. With ``global_batch`` (several ranks) this rank's share of
        the global-batch loss: the task loss summed over its samples / ``global_batch``; the
        gate losses in ``out.aux_losses`` are already shares."""
        kind = self.cfg.loss.kind
        if kind == "auto":
            kind = "mixture_nll" if out.output_kind == "probs" else "cross_entropy"
        if kind == "mixture_nll" and out.output_kind != "probs":
            raise ConfigError("loss.kind='mixture_nll' needs experts that output probabilities")
        if global_batch is None:
            if kind == "mixture_nll":
                main = losses.mixture_nll(out.output, y_B)
            else:
                main = losses.logits_cross_entropy(out.output.float(), y_B, double_softmax=kind == "double_softmax")
        elif kind == "mixture_nll":  # sums, not means: a rank may hold no sample of a batch
            picked_B = out.output.gather(1, y_B.long().unsqueeze(1)).squeeze(1)
            main = -torch.log(picked_B + 1e-7).sum() / global_batch  # mixture_nll's eps
        else:
            logits_BC = out.output.float()
            if kind == "double_softmax":
                logits_BC = torch.softmax(logits_BC, dim=1)
            main = F.cross_entropy(logits_BC, y_B.long(), reduction="sum") / global_batch
        parts = {"nll": main, **out.aux_losses}
        return main + sum(out.aux_losses.values(), torch.zeros((), device=main.device)), parts

    def _global_values(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss parts of the global batch: the ranks' shares summed (one small all-reduce)."""
        names = list(parts)
        values = torch.stack([parts[k].detach().float() for k in names])
        if self.ctx.distributed:
            dist.all_reduce(values)
        return dict(zip(names, values.tolist()))

    def _global_batch_size(self, batches: TensorBatches, index: int) -> int | None:
        """Size of global batch ``index`` (None in a single process: the local batch is it)."""
        if not self.ctx.distributed:
            return None
        return min(batches.batch_size, len(batches.split) - index * batches.batch_size)

    def train_step(self, x: torch.Tensor, y_B: torch.Tensor,
                   global_batch: int | None = None) -> tuple[dict[str, float], Any, bool]:
        """Forward, loss, backward, step. Returns the loss parts, the forward output, and
        whether early stopping fired (checked on this step's loss before the update, as
        Chen et al.'s loop does). With several ranks ``global_batch`` is the size of the
        global batch this rank's ``x`` is a share of; the returned values are global."""
        self.model.train()
        with self.accelerator.autocast():
            out = self.model(x)
            loss, parts = self.compute_loss(out, y_B, global_batch)
        t = self.cfg.train
        if self.ctx.distributed:
            values = self._global_values({"loss": loss, **parts})
            value = values["loss"]  # the same on every rank: early stopping stays in step
        else:
            value = float(loss.detach())
        if t.early_stop_rise or t.early_stop_loss:
            if self.state.epoch >= t.early_stop_after and (
                    (t.early_stop_rise and value > self.state.min_loss + t.early_stop_rise)
                    or (t.early_stop_loss and value <= t.early_stop_loss)):
                return {"loss": value}, out, True
            self.state.min_loss = min(self.state.min_loss, value)
        if self.engine is not None:
            # DeepSpeed averages gradients over the N ranks; our loss is a share (module doc
            # of moe_dist.parallel.deepspeed_engine): N * share makes the average a sum.
            self.engine.backward(loss * self.ctx.world_size)
            self.engine.step()  # also zeroes the gradients
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self.ctx.distributed:
                loss.backward()
                self.reduce_gradients()
            else:
                self.accelerator.backward(loss)
            self.optimizer.step()
        self.state.step += 1
        if self.ctx.distributed:
            return values, out, False
        return {"loss": value, **{k: float(v.detach()) for k, v in parts.items()}}, out, False

    def train_epoch(self) -> dict[str, Any] | None:
        """One epoch's steps and record; None when a signal stopped it mid-epoch (its position
        and running sums are then in ``self.state``, and the next call continues there)."""
        epoch = self.state.epoch
        # After a preemption: loss sums (global values) on every rank, counts on rank 0 only
        # (they were summed over ranks when saved).
        partial, first = self.state.partial, self.state.batch
        counts = partial.get("counts", {}) if self.ctx.rank == 0 else {}
        sums: dict[str, float] = dict(partial.get("sums", {}))
        num_batches = partial.get("num_batches", 0)
        correct, seen = counts.get("correct", 0), counts.get("seen", 0)
        counts_KE = torch.zeros(self.num_clusters, max(self.num_experts, 1), dtype=torch.long, device=self.device)
        if counts:
            counts_KE += torch.tensor(counts["clusters_experts"], dtype=torch.long,
                                      device=self.device).view_as(counts_KE)
        augment_gen = torch.Generator(device=self.device)
        augment_gen.manual_seed(self.cfg.seed * 1_000_003 + epoch)
        if self.data.augment == "cifar" and first:  # replay the skipped batches' draws
            for x, _, _ in itertools.islice(self.train_batches.batches(epoch), first):
                cifar_augment(x, augment_gen)
        batches = self.train_batches.batches(epoch, first)
        stopped = False
        routing = {"routed": 0, "dropped": 0, "expert_rows": 0, "padded_rows": 0, **counts.get("routing", {})}
        step_seconds, timed_steps = 0.0, 0  # this session's steps only
        for index, (x, y_B, idx_B) in enumerate(batches, first):
            if self.data.augment == "cifar":
                x = cifar_augment(x, augment_gen)
            step_start = time.perf_counter()
            parts, out, stopped = self.train_step(x, y_B, self._global_batch_size(self.train_batches, index))
            step_seconds += time.perf_counter() - step_start
            timed_steps += 1
            if stopped:
                break
            for k in routing:
                routing[k] += out.routing_stats.get(k, 0)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            num_batches += 1
            correct += int((out.output.argmax(1) == y_B).sum())
            seen += len(y_B)
            if self.num_clusters and out.expert_index is not None:
                # Dispatch counts of this (noisy) training forward pass (paper-spec B.4).
                counts_KE.index_put_((self.train_split.cluster[idx_B], out.expert_index[:, 0]),
                                     torch.ones_like(y_B), accumulate=True)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(epoch=epoch + 1, loss=f"{parts['loss']:.4f}", refresh=False)
            if self.preemption.agreed(self.ctx.distributed, self.device):
                self._keep_partial_epoch(index + 1, sums, num_batches, correct, seen, routing, counts_KE)
                return None
        self.state.batch, self.state.partial = 0, {}
        if self.ctx.distributed:  # one all-reduce of this epoch's counts
            flat = torch.cat([torch.tensor([correct, seen, *routing.values()], dtype=torch.float64),
                              counts_KE.flatten().cpu().double()])
            dist.all_reduce(flat)
            correct, seen = int(flat[0]), int(flat[1])
            routing = dict(zip(routing, (int(v) for v in flat[2:6])))
            counts_KE = flat[6:].view_as(counts_KE).long().to(counts_KE.device)
        # Mean batch loss, as the paper reports its training loss (paper-spec A.6).
        record: dict[str, Any] = {f"train_{k}": v / max(num_batches, 1) for k, v in sums.items()}
        if self.cfg.moe.capacity_factor > 0 and routing["routed"]:
            # pairs over capacity, and rows of the padded expert batches that carry no sample
            record["drop_rate"] = routing["dropped"] / routing["routed"]
            record["padding_ratio"] = 1.0 - routing["expert_rows"] / max(routing["padded_rows"], 1)
        record["train_error"] = 1.0 - correct / seen if seen else float("nan")
        self.step_seconds_by_rank = self._step_seconds_by_rank(step_seconds / max(timed_steps, 1))
        if self.num_clusters and self.is_moe and seen:
            record["dispatch_entropy"] = dispatch_entropy(counts_KE.cpu())
        if stopped:
            self.state.stopped_early = epoch
        return record

    def _keep_partial_epoch(self, next_batch: int, sums: dict[str, float], num_batches: int, correct: int,
                            seen: int, routing: dict[str, int], counts_KE: torch.Tensor) -> None:
        """Put a preempted epoch's position and running sums into the state (checkpointed), so
        that the resumed epoch ends with the record an uninterrupted one has. The counts are
        this rank's: summed over ranks here and restored on rank 0 only, so the epoch-end
        all-reduce stays exact at any number of processes."""
        flat = torch.tensor([correct, seen, *routing.values(), *counts_KE.flatten().tolist()],
                            dtype=torch.float64, device=self.device)
        if self.ctx.distributed:
            dist.all_reduce(flat)
        total = [int(v) for v in flat.tolist()]
        split = 2 + len(routing)
        self.state.batch = next_batch
        self.state.partial = {
            "sums": dict(sums), "num_batches": num_batches,
            "counts": {"correct": total[0], "seen": total[1], "routing": dict(zip(routing, total[2:split])),
                       "clusters_experts": total[split:]},
        }

    def evaluate(self, split: Split | None = None) -> dict[str, Any]:
        """Exact metrics over the whole split (never a last batch): paper-spec A.7.

        Runs on a forked RNG, so evaluating (which may draw routing noise) never changes the
        training run's random stream: a run evaluated every epoch trains exactly like one
        evaluated once."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return self._evaluate(split)

    def _evaluate(self, split: Split | None) -> dict[str, Any]:
        self.model.eval()
        batches = self.eval_batches if split is None else TensorBatches(
            split, self.cfg.train.eval_batch_size, shuffle=False, seed=0,
            rank=self.ctx.rank, world_size=self.ctx.world_size)
        acc = EvalAccumulator(self.num_experts, self.data.num_classes, self.num_clusters)
        for index, (x, y_B, idx_B) in enumerate(batches.batches(0)):
            global_batch = self._global_batch_size(batches, index)
            with self.accelerator.autocast():
                out = self.model(x)
                loss, _ = self.compute_loss(out, y_B, global_batch)
            # cluster counts are per expert: a single model (no routing) has none
            routed = out.expert_index is not None
            clusters = batches.split.cluster[idx_B] if self.num_clusters and routed else None
            top_pred = out.top_expert_output.argmax(1) if out.top_expert_output is not None else None
            # per-sample losses summed: a share of the global batch's loss times its size
            acc.update(y_B, out.output.float(), out.gate_probs,
                       out.expert_index[:, 0] if out.expert_index is not None else None,
                       top_pred, clusters, float(loss) * (global_batch or len(y_B)))
        if self.ctx.distributed:  # exact metrics: every count summed over ranks, once
            for t in acc.state_tensors():
                dist.all_reduce(t)
        return acc.compute()

    def _step_seconds_by_rank(self, mean_step_seconds: float) -> list[float]:
        """Every rank's mean step time this epoch (one small all-gather), for the main rank's
        ``perf/step_seconds/*``. Ranks wait for each other in the collectives, so the times
        differ by the work outside them (optimizer step, data)."""
        if not self.ctx.distributed:
            return [mean_step_seconds]
        mine = torch.tensor([mean_step_seconds], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            mine = mine.to(self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, mine)
        return [float(t) for t in gathered]

    # ----------------------------------------------------------------------------- schedule
    def _log(self, epoch: int, record: dict[str, Any], metrics: dict[str, Any] | None) -> None:
        if self.writer is None:
            return
        w = self.writer
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "epoch":
                name = k[len("train_"):] if k.startswith("train_") else k
                tag = "moe/" + name if name in ("dispatch_entropy", "drop_rate", "padding_ratio") else f"train/{name}"
                w.add_scalar(tag, v, epoch)
        w.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], epoch)
        by_rank = self.step_seconds_by_rank  # not in the history: timings differ between runs
        for rank, seconds in enumerate(by_rank):
            w.add_scalar(f"perf/step_seconds/rank{rank}", seconds, epoch)
        if by_rank:
            w.add_scalar("perf/step_seconds/max", max(by_rank), epoch)
            w.add_scalar("perf/step_seconds/mean", sum(by_rank) / len(by_rank), epoch)
        if metrics is None:
            return
        w.add_scalar("eval/error", metrics["error"], epoch)
        w.add_scalar("eval/loss", metrics["loss"], epoch)
        for key in ("sample_entropy", "usage_entropy", "mutual_information",
                    "mutual_information_predicted", "experts_used", "dispatch_entropy"):
            if key in metrics:
                w.add_scalar(f"moe/{'test_' if key == 'dispatch_entropy' else ''}{key}", metrics[key], epoch)
        if "selection_table" in metrics:
            fig = selection_heatmap(metrics["selection_table"], self.data.class_names,
                                    title=f"expert selection, epoch {epoch + 1}")
            w.add_figure("moe/selection_table", fig, epoch)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._resume()
        if self.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            # purge_step drops events a killed session logged after its last checkpoint.
            self.writer = SummaryWriter(str(self.run_dir), purge_step=self.state.epoch)
        metrics: dict[str, Any] | None = None
        if cfg.train.progress and self.is_main:
            steps = len(self.train_batches)
            self.bar = tqdm(total=cfg.train.epochs * steps, initial=self.state.epoch * steps + self.state.batch,
                            desc=cfg.name or self.run_dir.name, mininterval=1.0, leave=False)
        self.preemption.install()  # SIGUSR1/SIGTERM: stop after the current step (close() restores)
        while self.state.epoch < cfg.train.epochs and self.state.stopped_early < 0:
            epoch = self.state.epoch
            start = time.perf_counter()
            trained = self.train_epoch()
            if trained is None:
                self._stop_preempted(time.perf_counter() - start)
            record = {"epoch": epoch, **trained}
            self.scheduler.step()
            record["epoch_seconds"] = time.perf_counter() - start
            self.state.wall_seconds += record["epoch_seconds"]
            last = epoch + 1 == cfg.train.epochs or self.state.stopped_early >= 0
            metrics = None
            if last or (epoch + 1) % cfg.train.eval_every == 0:
                metrics = self.evaluate()
                record["test_error"] = metrics["error"]
                record["test_loss"] = metrics["loss"]
                for key in ("sample_entropy", "usage_entropy", "mutual_information", "experts_used"):
                    if key in metrics:
                        record[key] = metrics[key]
            self.state.history.append(record)
            self.state.epoch = epoch + 1
            self._log(epoch, record, metrics)
            if last or self.state.epoch % cfg.train.checkpoint_every == 0:
                self._checkpoint()
        if self.bar is not None:
            self.bar.close()
        try:
            return self.finish(metrics)
        finally:
            self.close()

    def _stop_preempted(self, seconds: float) -> None:
        """Checkpoint the interrupted epoch, wait until every rank is past the checkpoint and the
        event file (a launcher kills the other ranks once one exits), leave, raise Preempted."""
        self.state.wall_seconds += seconds
        self._checkpoint()
        if self.writer is not None:
            self.writer.close()
        if self.ctx.distributed:
            dist.barrier()
        if self.bar is not None:
            self.bar.close()
        self.close()
        raise Preempted(self.preemption.agreed_signum, str(self.ckpt_dir), self.state.step)

    def close(self) -> None:
        """Restore the signal handlers and leave the process group if this trainer joined it
        (design.md: a gloo run that skips destroy_process_group aborts at exit about one time
        in ten)."""
        self.preemption.uninstall()
        if self._owns_process_group:
            destroy_distributed()
            self._owns_process_group = False

    def finish(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Final evaluation on the whole test and training sets; writes metrics.json."""
        metrics = metrics or self.evaluate()
        train_metrics = self.evaluate(self.train_split)
        history = self.state.history
        result: dict[str, Any] = {
            "test_error": metrics["error"],
            "test_loss": metrics["loss"],
            "train_error": train_metrics["error"],
            "train_loss": train_metrics["loss"],
            "final_train_loss": history[-1].get("train_loss") if history else None,
        }
        for key in ("mutual_information", "mutual_information_predicted", "sample_entropy",
                    "usage_entropy", "selection_table", "soft_selection_table", "per_expert_accuracy",
                    "samples_per_expert", "experts_used"):
            if key in metrics:
                result[key] = metrics[key]
        if self.num_clusters and self.is_moe:
            trained = [h for h in history if "dispatch_entropy" in h]
            result["dispatch_entropy"] = trained[-1]["dispatch_entropy"] if trained else None
            result["test_dispatch_entropy"] = metrics.get("dispatch_entropy")
        result.update({
            "epochs_completed": self.state.epoch,
            "stopped_early_at": self.state.stopped_early if self.state.stopped_early >= 0 else None,
            "steps": self.state.step,
            "wall_seconds": self.state.wall_seconds,
            "step_seconds": self.state.wall_seconds / max(self.state.step, 1),
            "peak_memory_mb": peak_memory_mb(self.device),
            "hardware": hardware_description(self.device),
            "num_processes": self.ctx.world_size,
            "engine": self.cfg.engine,
            "ep_size": self.ctx.ep_size,
            "torch": torch.__version__,
            "history": history,
        })
        if self.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
            if self.writer is not None:
                hparams = {k: v for k, v in _flatten(to_dict(self.cfg)).items()
                           if isinstance(v, (int, float, str, bool))}
                scalars = {f"hparam/{k}": result[k] for k in
                           ("test_error", "train_error", "mutual_information", "sample_entropy", "usage_entropy")
                           if isinstance(result.get(k), (int, float))}
                # into the run's one event stream (add_hparams would open a second file)
                for summary in hparams_summary(hparams, scalars):
                    self.writer.file_writer.add_summary(summary)
                for tag, value in scalars.items():
                    self.writer.add_scalar(tag, value)
                self.writer.close()
        if self.ctx.distributed:
            # fit() returns on every rank once the run folder is complete: a procedure's next
            # step (is_complete, latest_weights, a table) reads it on every rank.
            dist.barrier()
        return result
