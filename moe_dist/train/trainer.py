"""The training loop: ``fit`` schedules (evaluation, logging, checkpoints, early stopping,
preemption); ``forward_loss`` and the engine's ``update`` compute. Build one with
:func:`moe_dist.train.build.build_trainer`.

Multi-process runs (torchrun, ``accelerate launch``, SLURM; docs/design.md choices 3-7):
the global batch ``train.batch_size`` is the unit. Each rank takes its contiguous share of
every global batch, in the single-process order; its loss is its *share* of the
global-batch loss (``moe_dist.losses.task_loss`` over its samples / the global batch size,
plus its share of the gate losses, which ``moe_dist.parallel`` reduces over the global
batch), and the engine sums the gradients. N ranks thus follow the single-process
trajectory. Only rank 0 writes files; checkpoints hold all experts by global id (any
ep_size can resume them); evaluation counts are all-reduced once.

Legend: B = batch (this rank's share), C = classes, E = experts.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from moe_dist import fields
from moe_dist.config import Config, check_resumable, from_dict, routing_groups, to_dict
from moe_dist.data import Split, TensorBatches
from moe_dist.data.augment import cifar_augment, cifar_draws
from moe_dist.errors import CheckpointError, ConfigError
from moe_dist.losses import model_loss
from moe_dist.parallel import all_gather_floats, all_reduce, barrier, collective_failure, destroy_distributed, traffic
from moe_dist.rundir import METRICS_FORMAT, RunDir
from moe_dist.train.engines import Engine
from moe_dist.train.evaluate import batch_share, evaluate, global_batch_size
from moe_dist.train.events import SummaryWriter, log_epoch, log_final
from moe_dist.train.hardware import hardware_description, peak_memory_mb
from moe_dist.train.preemption import Preempted, PreemptionFlag
from moe_dist.train.state import TrainState
from moe_dist.train.tally import EpochTally

__all__ = ["Trainer", "StepOutput", "EpochOutcome"]


#: ``extra_metrics(trainer, result) -> fields`` added to metrics.json (``Trainer.fit``).
ExtraMetrics = Callable[["Trainer", dict[str, Any]], dict[str, Any]]


@dataclass
class StepOutput:
    """A training step's loss (this rank's share, for backward), the global batch's loss
    parts as floats (the same on every rank), and the forward output."""

    loss: torch.Tensor
    values: dict[str, float]
    out: Any


@dataclass
class EpochOutcome:
    """What an epoch's steps produced: its history record, or a stop."""

    record: dict[str, Any] = field(default_factory=dict)
    stopped_early: str | None = None  # why early stopping fired (the epoch's record is still complete)
    preempted: bool = False  # a signal stopped it mid-epoch; position and sums are in the state


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """The line printed after each epoch: its number, losses, test metrics when evaluated, time."""
    parts = [f"epoch {record['epoch']}/{epochs}"]
    for key, label, unit in (("train_loss", "train loss", ""), ("test_error", "test error", ""), ("usage_entropy", "H_u", " bits"),
                             ("mutual_information", "I(E;Y)", " bits"), ("dispatch_entropy", "dispatch entropy", "")):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{label} {record[key]:.4f}{unit}")
    return ", ".join(parts) + f", {record['epoch_seconds']:.1f} s"


class Trainer:
    """Trains one run: holds its config, run folder, engine, data and LR schedule."""

    def __init__(self, cfg: Config, run: RunDir, engine: Engine, data: Any, scheduler: Any, *,
                 owns_process_group: bool = False, started: float | None = None) -> None:
        self.cfg = cfg
        self.run = run
        self.engine = engine
        self.data = data  # moe_dist.train.build.RunData
        self.scheduler = scheduler
        self.state = TrainState()
        self.preemption = PreemptionFlag()  # installed while fit() runs
        self.writer: SummaryWriter | None = None
        self.bar: tqdm | None = None
        self.step_seconds_by_rank: list[float] = []  # the last epoch's mean step time of every rank
        # Bytes sent to other ranks (moe_dist.parallel.traffic), summed over the ranks: this
        # session's training steps, and the last epoch's per step and rank (TensorBoard)
        self.comm_bytes: dict[str, float] = dict.fromkeys(traffic.KINDS, 0.0)
        self.comm_steps = 0
        self.epoch_comm_bytes: dict[str, float] = {}
        self._owns_process_group = owns_process_group
        self._started = time.perf_counter() if started is None else started  # this session, for total_seconds
        self._earlier_seconds = 0.0  # total_seconds of the sessions before this one

    # ----------------------------------------------------------------------------- handles
    @property
    def model(self) -> torch.nn.Module:
        """The bare model (this rank's experts when they are sharded)."""
        return self.engine.module

    @property
    def ctx(self):
        return self.engine.ctx

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def num_experts(self) -> int:
        return self.cfg.moe.num_experts if self.cfg.model.kind == "moe" else 0

    def say(self, line: str) -> None:
        """One line to the user from the main rank, above the progress bar when there is one.
        To stderr, as the bar: stdout stays for results (the final table, ``eval --json``)."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load full-layout weights (a checkpoint's ``model``, any ep_size) into this rank's part."""
        self.engine.load_model_state(state)

    # ----------------------------------------------------------------------------- compute
    def forward_loss(self, x: torch.Tensor, y_B: torch.Tensor, global_batch: int | None = None) -> StepOutput:
        """Forward and loss in training mode. ``global_batch``: the size of the global batch
        this rank's ``x`` is a share of (None in one process)."""
        self.engine.train()
        with self.engine.autocast():
            out = self.engine(x)
            loss, parts = model_loss(out, y_B, self.cfg.loss.kind, global_batch)
        if self.ctx.distributed:  # the global batch's values: the ranks' shares summed
            names = ["loss", *parts]
            summed = all_reduce(torch.stack([t.detach().float() for t in (loss, *parts.values())]))
            return StepOutput(loss, dict(zip(names, summed.tolist())), out)
        values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
        return StepOutput(loss, values, out)

    def train_step(self, x: torch.Tensor, y_B: torch.Tensor, global_batch: int | None = None) -> StepOutput:
        """Forward, loss, backward, update."""
        step = self.forward_loss(x, y_B, global_batch)
        self.engine.update(step.loss)
        self.state.step += 1
        return step

    def evaluate(self, split: Split | None = None) -> dict[str, Any]:
        """Exact metrics over the whole test split (or ``split``), docs/papers.md A.7."""
        batches = self.data.eval_batches if split is None else TensorBatches(
            split, self.cfg.train.eval_batch_size, shuffle=False, seed=0,
            rank=self.ctx.rank, world_size=self.ctx.world_size)
        return evaluate(self.engine, batches, self.data.dataset.num_classes, num_experts=self.num_experts,
                        num_clusters=self.data.num_clusters, num_groups=routing_groups(self.cfg) or 0,
                        loss_kind=self.cfg.loss.kind,
                        autocast=self.engine.autocast)

    # ----------------------------------------------------------------------------- one epoch
    def _augmenter(self, epoch: int, first: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """The epoch's training augmentation (CIFAR-100: crops and flips) of batch ``index``,
        from a generator seeded by (seed, epoch). Every rank draws the whole global batch
        and applies its rows, so N ranks draw what one process draws; a resumed epoch
        replays the skipped batches' draws."""
        if self.data.dataset.augment != "cifar":
            return lambda x, index: x
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.cfg.seed * 1_000_003 + epoch)
        batches = self.data.train_batches
        for index in range(first):
            cifar_draws(batch_share(batches, index)[0], gen)

        def augment(x: torch.Tensor, index: int) -> torch.Tensor:
            total, offset = batch_share(batches, index)
            return cifar_augment(x, gen, global_batch=total, offset=offset)
        return augment

    def train_epoch(self) -> EpochOutcome:
        """The steps of epoch ``state.epoch`` from batch ``state.batch`` on. Early stopping is
        checked on each step's loss before its update, as Chen et al.'s loop does."""
        epoch, first = self.state.epoch, self.state.batch
        with_clusters = self.data.num_clusters > 0
        # After a preemption: loss sums on every rank, counts on rank 0 only (summed when saved).
        tally = EpochTally(self.data.num_clusters, self.num_experts, self.device, self.state.partial,
                           restore_counts=self.ctx.rank == 0)
        augment = self._augmenter(epoch, first)
        batches = self.data.train_batches
        stopped, step_seconds, timed_steps = None, 0.0, 0  # this session's steps only
        sent_before = traffic.SENT.snapshot()
        for index, (x, y_B, idx_B) in enumerate(batches.batches(epoch, first), first):
            x = augment(x, index)
            start = time.perf_counter()
            step = self.forward_loss(x, y_B, global_batch_size(batches, index))
            stopped = self.state.early_stop(step.values["loss"], self.cfg.train)  # the reason, or None
            if not stopped:
                self.engine.update(step.loss)
                self.state.step += 1
            step_seconds += time.perf_counter() - start
            timed_steps += 1
            if stopped:
                break
            tally.add(step.values, step.out, y_B, self.data.train.cluster[idx_B] if with_clusters else None)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(epoch=epoch + 1, loss=f"{step.values['loss']:.4f}", refresh=False)
            if self.preemption.agreed(self.ctx.distributed, self.device):
                self.state.batch, self.state.partial = index + 1, tally.partial()
                return EpochOutcome(preempted=True)
        self.state.batch, self.state.partial = 0, {}
        self._add_traffic(traffic.SENT.since(sent_before), timed_steps)
        record = tally.record(self.cfg.moe.capacity_factor, with_dispatch_entropy=with_clusters and self.num_experts > 0)
        # every rank's mean step time (one small all-gather) for perf/step_seconds/*: ranks wait
        # for each other in the collectives, so the times differ by the work outside them
        self.step_seconds_by_rank = all_gather_floats(step_seconds / max(timed_steps, 1))
        return EpochOutcome(record, stopped_early=stopped)

    def _add_traffic(self, sent: dict[str, int], steps: int) -> None:
        """Add an epoch's bytes sent (this rank's, ``steps`` steps) to the session's, summed
        over the ranks: one small all-reduce per epoch, none per step. Evaluation, checkpoints
        and this reduction fall outside the epoch's steps and are not counted."""
        if not self.ctx.distributed or not steps:
            return
        summed = all_reduce(torch.tensor([float(sent[k]) for k in traffic.KINDS], dtype=torch.float64)).tolist()
        for kind, value in zip(traffic.KINDS, summed):
            self.comm_bytes[kind] += value
        self.comm_steps += steps
        world = self.ctx.world_size
        self.epoch_comm_bytes = {k: v / (steps * world) for k, v in zip(traffic.KINDS, summed)}

    def comm_bytes_per_step(self) -> dict[str, float] | None:
        """Bytes one rank sends to the others per training step, by kind and in total (mean
        over the ranks and this session's steps); None in one process."""
        if not self.comm_steps:
            return None
        per_step = {k: v / (self.comm_steps * self.ctx.world_size) for k, v in self.comm_bytes.items()}
        return {**per_step, "total": sum(per_step.values())}

    # ----------------------------------------------------------------------------- schedule
    def fit(self, extra_metrics: ExtraMetrics | None = None) -> dict[str, Any]:
        """Train to ``train.epochs`` (resuming the run folder's checkpoint), then finish.
        ``extra_metrics(trainer, result)`` adds a procedure's own fields to metrics.json
        (distillation's top-k evaluation), so the file is still written once, complete.
        A collective that times out (``parallel.timeout_s``) or loses a rank raises
        :class:`~moe_dist.errors.CollectiveError`, one line that names it."""
        try:
            return self._fit(extra_metrics)
        except RuntimeError as exc:
            error = collective_failure(exc)
            if error is None:
                raise
            # Another rank died or hangs: the group is unusable and the last checkpoint is
            # complete. Restore the signal handlers and leave the group (if this trainer
            # joined it) so that nothing waits on it again; the caller decides how to exit.
            self.close()
            raise error from exc

    def _fit(self, extra_metrics: ExtraMetrics | None) -> dict[str, Any]:
        finished = self.run.finished(self.cfg)  # every rank reads it: they all decide alike...
        barrier()  # ...when none reads after rank 0 rewrote config.yaml in _start (a resume could hang)
        if finished:
            self.say(f"{self.run.path} is finished (train.epochs={self.cfg.train.epochs}): nothing to train "
                     f"(`moe-dist eval {self.run.path}` evaluates it again)")
            self.close()
            return self.run.read_metrics()
        self._start()
        metrics: dict[str, Any] | None = None
        while self.state.epoch < self.cfg.train.epochs and self.state.stopped_early < 0:
            metrics = self._fit_epoch()
        if self.bar is not None:
            self.bar.close()
        try:
            return self.finish(metrics, extra_metrics)
        finally:
            self.close()

    def _start(self, install_signals: bool = True) -> None:
        if self.is_main:
            self.run.prepare()  # clears what a killed write left
        self._resume()
        if self.is_main:
            self.run.write_config(self.cfg)
            # purge_step drops events a killed session logged after its last checkpoint (epochs
            # are logged at their number, from 1, as everywhere: epoch_0003.pt follows epoch 3).
            self.writer = SummaryWriter(str(self.run.path), purge_step=self.state.epoch + 1)
        if self.cfg.train.progress and self.is_main:
            steps = len(self.data.train_batches)
            self.bar = tqdm(total=self.cfg.train.epochs * steps, initial=self.state.epoch * steps + self.state.batch,
                            desc=self.cfg.name or self.run.path.name, mininterval=1.0)
        if install_signals:  # a stack of runs installs one flag for all its members
            self.preemption.install()  # SIGUSR1/SIGTERM: stop after the current step (close() restores)

    def _fit_epoch(self) -> dict[str, Any] | None:
        """One epoch, its evaluation when due, its record, logs and checkpoint; returns the
        evaluation's metrics (None when not evaluated)."""
        start = time.perf_counter()
        outcome = self.train_epoch()
        if outcome.preempted:
            self._stop_preempted(time.perf_counter() - start)
        return self.end_epoch(outcome, time.perf_counter() - start)

    def end_epoch(self, outcome: EpochOutcome, seconds: float) -> dict[str, Any] | None:
        """What follows epoch ``state.epoch``'s steps (``seconds`` of training): the schedule,
        the evaluation when due, the record, logs and checkpoint. Returns the evaluation's
        metrics (None when not evaluated). A stack of runs calls it for each member."""
        epoch = self.state.epoch
        if outcome.stopped_early:
            self.state.stopped_early = epoch
            self.say(f"early stopping in epoch {epoch + 1} of {self.cfg.train.epochs}: {outcome.stopped_early}")
        record = {"epoch": epoch + 1, **outcome.record}  # epochs completed, from 1
        if not outcome.stopped_early:  # the run ends: no later epoch uses the schedule (and a
            self.scheduler.step()      # stop in the first step has no optimizer step to follow)
        record["epoch_seconds"] = seconds
        self.state.wall_seconds += seconds
        last = epoch + 1 == self.cfg.train.epochs or self.state.stopped_early >= 0
        metrics = None
        if last or (epoch + 1) % self.cfg.train.eval_every == 0:
            metrics = self.evaluate()
            record.update({"test_error": metrics["error"], "test_loss": metrics["loss"]})
            record.update({k: metrics[k] for k in fields.history_eval_fields() if k in metrics})
        self.state.history.append(record)
        self.state.epoch = epoch + 1
        self.say(epoch_line(record, self.cfg.train.epochs))
        if self.writer is not None:
            log_epoch(self.writer, epoch + 1, record, metrics, self.engine.optimizer.param_groups[0]["lr"],
                      self.step_seconds_by_rank, self.data.dataset.class_names, self.epoch_comm_bytes)
        if last or self.state.epoch % self.cfg.train.checkpoint_every == 0:
            self.checkpoint()
        return metrics

    def _stop_preempted(self, seconds: float) -> None:
        """Checkpoint the interrupted epoch, wait until every rank is past the checkpoint and the
        event file (a launcher kills the other ranks once one exits), leave, raise Preempted."""
        self.state.wall_seconds += seconds
        self.checkpoint()
        if self.writer is not None:
            self.writer.close()
        barrier()
        if self.bar is not None:
            self.bar.close()
        self.close()
        raise Preempted(self.preemption.agreed_signum, str(self.run.checkpoints), self.state.step)

    def close(self) -> None:
        """Restore the signal handlers and leave the process group if this trainer joined it
        (docs/design.md: a gloo run that skips destroy_process_group aborts at exit about one
        time in ten)."""
        self.preemption.uninstall()
        if self._owns_process_group:
            destroy_distributed()
            self._owns_process_group = False

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint(self) -> None:
        """Save weights, optimizer, schedule, RNG and state (collective when experts are
        sharded: every rank gathers, rank 0 writes)."""
        model_state = self.engine.model_state()
        optimizer_state = self.engine.optimizer_state()
        if not self.is_main:
            return
        self.state.total_seconds = self._total_seconds()
        payload = {
            "config": to_dict(self.cfg),
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.engine.scheduler_state(self.scheduler),
            **self.rng_states(),
            "state": self.state.to_json(),
        }
        self.run.save_checkpoint(payload, self.state.epoch, step=self.state.step if self.state.batch else None,
                                 keep=self.cfg.train.keep_checkpoints)

    def _resume(self) -> None:
        """Continue from the newest checkpoint that verifies (damaged newer ones are skipped,
        and said); refuse what would overwrite a finished run or train fewer epochs."""
        # Loaded on the CPU whatever the device: the RNG states must stay CPU ByteTensors
        # (torch.set_rng_state rejects a CUDA tensor), and load_state_dict copies weights and
        # optimizer moments to their parameters' device.
        try:
            payload = self.run.load_checkpoint(map_location="cpu", on_skip=lambda why: self.say(f"{self.run.path}: {why}"))
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; move {self.run.path} away, or `moe-dist train --overwrite` "
                                  "to train it again from scratch") from None
        if payload is None:
            if self.run.metrics_path.exists():
                raise ConfigError(f"{self.run.path} holds a finished run's metrics.json but no checkpoint to continue "
                                  "from: use another run_dir, or `moe-dist train --overwrite` to train it again")
            return
        check_resumable(from_dict(payload["config"]), self.cfg, str(self.run.path))
        state = TrainState.from_json(payload["state"])
        if state.epoch > self.cfg.train.epochs:
            raise ConfigError(f"{self.run.path} has trained {state.epoch} epochs, more than train.epochs="
                              f"{self.cfg.train.epochs}: raise it to continue, or evaluate the run with "
                              f"`moe-dist eval {self.run.path}`")
        self._load_checkpoint(payload)
        self.state, self._earlier_seconds = state, state.total_seconds
        within = f", batch {state.batch} of epoch {state.epoch + 1}" if state.batch else ""
        self.say(f"resumed {self.run.path} after epoch {state.epoch}{within}")

    def _load_checkpoint(self, payload: dict[str, Any]) -> None:
        """Weights, optimizer moments, LR schedule and RNG of a checkpoint."""
        self.engine.load_model_state(payload["model"])
        if payload["optimizer"]:
            self.engine.load_optimizer_state(payload["optimizer"])
        else:
            self.say(f"{self.run.path}: the checkpoint holds no optimizer state (written by engine=deepspeed at "
                     "ZeRO >= 1 before moe_dist saved it); optimizer moments restart")
        self.engine.load_scheduler_state(self.scheduler, payload["scheduler"])
        self.load_rng_states(payload)

    def rng_states(self) -> dict[str, Any]:
        """The random state the run draws from while training (routing noise), as saved."""
        return {"rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_rng_states(self, payload: dict[str, Any]) -> None:
        torch.set_rng_state(payload["rng_cpu"])
        if torch.cuda.is_available() and payload.get("rng_cuda") is not None:
            torch.cuda.set_rng_state_all(payload["rng_cuda"])

    def _total_seconds(self) -> float:
        """Wall time of every session of the run so far."""
        return self._earlier_seconds + time.perf_counter() - self._started

    # ----------------------------------------------------------------------------- the end
    def finish(self, metrics: dict[str, Any] | None = None,
               extra_metrics: ExtraMetrics | None = None) -> dict[str, Any]:
        """Final evaluation on the whole test and training sets; writes metrics.json last
        (the completion marker) and returns it on every rank once it is written."""
        metrics = metrics or self.evaluate()
        result = self._result(metrics, self.evaluate(self.data.train))
        if extra_metrics is not None:  # collective like evaluate(): every rank calls it
            result.update(extra_metrics(self, result))
        if self.is_main:
            if self.writer is not None:
                log_final(self.writer, self.cfg, result)
            self.run.write_metrics(result)
        # a procedure's next step (finished(), latest_weights, a table) reads it on every rank
        barrier()
        return result

    def _result(self, metrics: dict[str, Any], train_metrics: dict[str, Any]) -> dict[str, Any]:
        history = self.state.history
        result: dict[str, Any] = {
            "test_error": metrics["error"],
            "test_loss": metrics["loss"],
            "train_error": train_metrics["error"],
            "train_loss": train_metrics["loss"],
            "final_train_loss": history[-1].get("train_loss") if history else None,
        }
        result.update({k: metrics[k] for k in fields.final_eval_fields() if k in metrics})
        if self.data.num_clusters and self.num_experts:
            trained = [h for h in history if "dispatch_entropy" in h]
            result["dispatch_entropy"] = trained[-1]["dispatch_entropy"] if trained else None
            result["test_dispatch_entropy"] = metrics.get("dispatch_entropy")
        result.update({
            "epochs_completed": self.state.epoch,
            "stopped_early_at": self.state.stopped_early + 1 if self.state.stopped_early >= 0 else None,
            "steps": self.state.step,
            "train_seconds": self.state.wall_seconds,
            "total_seconds": self._total_seconds(),
            "step_seconds": self.state.wall_seconds / max(self.state.step, 1),
            "peak_memory_mb": peak_memory_mb(self.device),
            "hardware": hardware_description(self.device),
            "num_processes": self.ctx.world_size,
            "engine": self.cfg.engine,
            "ep_size": self.ctx.ep_size,
        })
        if self.comm_steps:
            result["comm_bytes_per_step"] = self.comm_bytes_per_step()
        result.update({
            "torch": torch.__version__,
            "format": METRICS_FORMAT,
            "history": history,
        })
        return result
