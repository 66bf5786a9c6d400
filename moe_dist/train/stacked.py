"""Stacked runs: several runs of one architecture and schedule trained in one process as one
computation (docs/design.md, choice 9). Build with :func:`build_stacked_trainer`.

Each member is an ordinary :class:`~moe_dist.train.trainer.Trainer` (:class:`MemberTrainer`)
with its own config, run folder, data order, optimizer, LR schedule, checkpoints, TensorBoard
events and metrics.json; only its steps are taken by :class:`StackedTrainer`, whose loop runs
the members' batches through one :class:`~moe_dist.models.stack.ModelStack` forward and
backward and then steps every member's optimizer. A member's checkpoint is an ordinary one
(its routing-noise generator saved as the run's RNG state), so ``report``, ``eval``, resume
and a sweep's skipping of finished runs treat members as runs; a stacked job resumes after a
kill or a preemption signal.

What members may differ in (:data:`STACKABLE_KEYS`): seed, run folder and name, the gate
losses (weights and L_s variant), the learning rate, the gate-noise scale and the run a
distillation starts from. Anything else splits them into separate stacks (:func:`stack_groups`).

A member whose training loss is not finite stops there, as a run alone does (an early stop
that says the run diverged), and is reported; the others go on (no operation of the stack
mixes members).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

from moe_dist.config import Config, flatten, to_dict
from moe_dist.data import Dataset
from moe_dist.errors import ConfigError
from moe_dist.losses import model_loss
from moe_dist.models.stack import ModelStack, stack_models
from moe_dist.parallel import ParallelContext, world_size
from moe_dist.rundir import RunDir
from moe_dist.train.build import build_network, build_run_data, load_data
from moe_dist.train.engines import Engine
from moe_dist.train.optim import build_optimizer, build_scheduler
from moe_dist.train.preemption import Preempted, PreemptionFlag
from moe_dist.train.process import choose_device, configure_process
from moe_dist.train.tally import EpochTally
from moe_dist.train.trainer import EpochOutcome, ExtraMetrics, Trainer

__all__ = ["STACKABLE_KEYS", "MemberTrainer", "StackedTrainer", "build_stacked_trainer", "stack_groups",
           "stack_key"]

#: Config keys whose values may differ between the members of one stack.
STACKABLE_KEYS = frozenset({"seed", "name", "run_dir", "loss.importance_weight", "loss.ls_beta", "loss.ls_gamma",
                            "loss.ls_variant", "loss.ls_squared", "train.lr", "moe.noise_std", "train.init_from",
                            "train.progress"})


def stack_key(cfg: Config) -> tuple:
    """Runs with equal keys can share a stack."""
    return tuple(sorted((k, repr(v)) for k, v in flatten(to_dict(cfg)).items() if k not in STACKABLE_KEYS))


def why_not_stackable(cfg: Config) -> str | None:
    """Why ``cfg`` cannot be stacked with other runs at all (None: it can)."""
    if cfg.engine != "moe_dist":
        return f"engine={cfg.engine!r} (stacks use the moe_dist engine)"
    if cfg.train.mixed_precision != "no":
        return f"train.mixed_precision={cfg.train.mixed_precision!r} (stacks train in float32)"
    if cfg.model.kind == "moe" and cfg.moe.routing == "hierarchical":
        return "moe.routing='hierarchical' (its two gates are not stacked)"
    if cfg.data.format == "webdataset":
        return "data.format='webdataset' (stacks read the data into memory)"
    return None


def stack_groups(cfgs: Sequence[Config]) -> list[list[int]]:
    """Indices of ``cfgs`` grouped into stacks, in first-appearance order: runs that may share
    a stack share one; a run that cannot be stacked (:func:`why_not_stackable`) is alone."""
    groups: dict[Any, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        key = ("alone", i) if why_not_stackable(cfg) else stack_key(cfg)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _check_stack(cfgs: Sequence[Config]) -> None:
    for cfg in cfgs:
        why = why_not_stackable(cfg)
        if why and len(cfgs) > 1:
            raise ConfigError(f"{cfg.name or cfg.run_dir} cannot be stacked: {why}")
    first = flatten(to_dict(cfgs[0]))
    for cfg in cfgs[1:]:
        other = flatten(to_dict(cfg))
        differ = sorted(k for k in first.keys() | other.keys()
                        if k not in STACKABLE_KEYS and first.get(k) != other.get(k))
        if differ:
            raise ConfigError(f"stacked runs must share {differ[0]} (only {', '.join(sorted(STACKABLE_KEYS))} "
                              f"may differ): {cfgs[0].name or cfgs[0].run_dir} has {first.get(differ[0])!r}, "
                              f"{cfg.name or cfg.run_dir} has {other.get(differ[0])!r}")
    run_dirs = [c.run_dir for c in cfgs]
    if len(set(run_dirs)) != len(run_dirs):
        raise ConfigError(f"stacked runs need one run_dir each; {run_dirs} repeats one")


class MemberEngine(Engine):
    """A member's optimizer on parameters that live in the stack: the stack runs forward and
    backward, hands out the gradients, then calls :meth:`step`."""

    def update(self, loss: torch.Tensor) -> None:
        raise RuntimeError("a stacked member is stepped by its StackedTrainer")

    def step(self) -> None:
        self.optimizer.step()

    def model_state(self) -> dict[str, torch.Tensor]:
        # Member tensors are views of the stack's storage, and saving a view saves its whole
        # storage: a checkpoint gets copies of this member's tensors only.
        return {k: v.clone() for k, v in super().model_state().items()}


class MemberTrainer(Trainer):
    """One run of a stack: an ordinary Trainer whose routing noise comes from its own generator
    (saved and restored as the run's RNG state) and whose lines name the run."""

    def __init__(self, *args: Any, generator: torch.Generator, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generator = generator
        self.frozen: dict[str, torch.Tensor] | None = None  # buffers kept from the step it stopped at
        self.last_metrics: dict[str, Any] | None = None  # its last epoch's evaluation, which finish() reuses

    def end_epoch(self, outcome: EpochOutcome, seconds: float) -> dict[str, Any] | None:
        self.thaw()
        self.last_metrics = super().end_epoch(outcome, seconds)
        return self.last_metrics

    def say(self, line: str) -> None:
        super().say(f"[{self.cfg.name or self.run.path.name}] {line}")

    def rng_states(self) -> dict[str, Any]:
        if self.generator.device.type == "cuda":
            return {"rng_cpu": torch.get_rng_state(), "rng_cuda": [self.generator.get_state()]}
        return {"rng_cpu": self.generator.get_state(), "rng_cuda": None}

    def load_rng_states(self, payload: dict[str, Any]) -> None:
        if self.generator.device.type == "cuda":
            if payload.get("rng_cuda"):
                self.generator.set_state(payload["rng_cuda"][self.generator.device.index or 0])
        else:
            self.generator.set_state(payload["rng_cpu"])

    def freeze(self) -> None:
        """Keep this member's buffers as they are: it stopped, and the stack's later forward
        passes (which still compute it) must not move its BatchNorm statistics."""
        self.frozen = {k: v.clone() for k, v in self.model.named_buffers()}

    def thaw(self) -> None:
        if self.frozen is not None:
            buffers = dict(self.model.named_buffers())
            with torch.no_grad():
                for k, v in self.frozen.items():
                    buffers[k].copy_(v)
            self.frozen = None


class StackedTrainer:
    """Trains its members (:class:`MemberTrainer`) in lockstep through one
    :class:`~moe_dist.models.stack.ModelStack`; see the module docstring."""

    def __init__(self, members: list[MemberTrainer], stack: ModelStack, finished: dict[int, dict[str, Any]],
                 order: list[int]) -> None:
        self.members = members  # the runs to train, in stack order
        self.stack = stack
        self.finished = finished  # position in the caller's list -> metrics of runs finished before
        self.order = order  # the caller's position of each member
        self.preemption = PreemptionFlag()
        self.extra_metrics: list[ExtraMetrics | None] = []

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def say(self, line: str) -> None:
        if self.members:
            self.members[0].say(line)

    def fit(self, extra_metrics: Sequence[ExtraMetrics | None] | None = None) -> list[dict[str, Any]]:
        """Train every member to its ``train.epochs`` (resuming their checkpoints); the members'
        metrics, in the order their configs were given (finished runs' read back).
        ``extra_metrics[i]``: what run i adds to its metrics.json (as ``Trainer.fit``'s)."""
        results = dict(self.finished)
        self.extra_metrics = list(extra_metrics or [])
        for m in self.members:
            m._start(install_signals=False)
        self.preemption.install()
        try:
            while unfinished := [i for i, m in enumerate(self.members) if not self._done(m)]:
                running = self._behind(unfinished)
                self._fit_epoch(running, [i for i in unfinished if i not in running])
                for i in running:
                    if self._done(self.members[i]):
                        results[self.order[i]] = self._finish(self.members[i])
            for i, m in enumerate(self.members):  # resumed after their last epoch
                if self.order[i] not in results:
                    results[self.order[i]] = self._finish(m)
        finally:
            self.preemption.uninstall()
            for m in self.members:
                m.close()
        return [results[i] for i in sorted(results)]

    def _behind(self, unfinished: list[int]) -> list[int]:
        """The members that stand furthest behind: they train the next epoch (or its rest).
        Members resume from one point unless a kill fell between their checkpoints; those
        behind then catch up while the others wait."""
        at = {i: (self.members[i].state.epoch, self.members[i].state.batch) for i in unfinished}
        first = min(at.values())
        if len(set(at.values())) > 1:
            self.say(f"catching up: {sum(p == first for p in at.values())} of {len(at)} runs stand at epoch "
                     f"{first[0]} batch {first[1]}, behind the others")
        return [i for i in unfinished if at[i] == first]

    @staticmethod
    def _done(m: MemberTrainer) -> bool:
        return m.state.epoch >= m.cfg.train.epochs or m.state.stopped_early >= 0

    def _finish(self, m: MemberTrainer) -> dict[str, Any]:
        if m.bar is not None:
            m.bar.close()
        m.thaw()
        position = self.order[self.members.index(m)]
        own = self.extra_metrics[position] if position < len(self.extra_metrics) else None

        def extra(trainer: Trainer, result: dict[str, Any]) -> dict[str, Any]:
            return {**(own(trainer, result) if own else {}), "stack_members": len(self.members)}
        # a run alone finishes with its last epoch's evaluation (evaluating again would draw
        # other routing noise where evaluation uses noise)
        return m.finish(m.last_metrics, extra_metrics=extra)

    def _fit_epoch(self, running: list[int], waiting: list[int]) -> None:
        """An epoch of the ``running`` members; the ``waiting`` ones (ahead of them) are
        computed but keep their state."""
        start = time.perf_counter()
        for i in waiting:
            self.members[i].freeze()
        try:
            outcomes = self.train_epoch(running)
        finally:
            for i in waiting:
                self.members[i].thaw()
        seconds = time.perf_counter() - start
        if any(o.preempted for o in outcomes.values()):
            self._stop_preempted(running, outcomes, seconds)
        for i in running:
            self.members[i].end_epoch(outcomes[i], seconds)

    # ----------------------------------------------------------------------------- one epoch
    def train_epoch(self, running: list[int]) -> dict[int, EpochOutcome]:
        """The steps of the running members' current epoch (they stand at one position). Every
        member of the stack is computed; only the running ones that have not stopped step."""
        lead = self.members[running[0]]
        epoch, first = lead.state.epoch, lead.state.batch
        tallies = {i: EpochTally(self.members[i].data.num_clusters, self.members[i].num_experts, self.device,
                                 self.members[i].state.partial) for i in running}
        augments = [m._augmenter(epoch, first) for m in self.members]
        feeds = [m.data.train_batches.batches(epoch, first) for m in self.members]
        stepping, stopped = list(running), {}
        step_seconds, timed = 0.0, 0
        for index, batches in enumerate(zip(*feeds), first):
            start = time.perf_counter()
            self.train_step(batches, index, augments, stepping, tallies, stopped)
            step_seconds += time.perf_counter() - start
            timed += 1
            if not stepping:
                break
            if self.preemption.agreed(False, self.device):
                for i in stepping:
                    m = self.members[i]
                    m.state.batch, m.state.partial = index + 1, tallies[i].partial()
                return {i: EpochOutcome(stopped_early=stopped.get(i), preempted=i in stepping,
                                        record=self._record(i, tallies[i]) if i in stopped else {})
                        for i in running}
        outcomes = {}
        for i in running:
            m = self.members[i]
            m.state.batch, m.state.partial = 0, {}
            m.step_seconds_by_rank = [step_seconds / max(timed, 1)]
            outcomes[i] = EpochOutcome(self._record(i, tallies[i]), stopped_early=stopped.get(i))
        return outcomes

    def _record(self, i: int, tally: EpochTally) -> dict[str, Any]:
        m = self.members[i]
        return tally.record(m.cfg.moe.capacity_factor,
                            with_dispatch_entropy=m.data.num_clusters > 0 and m.num_experts > 0)

    def train_step(self, batches: Sequence[tuple], index: int, augments: list, stepping: list[int],
                   tallies: dict[int, EpochTally], stopped: dict[int, str]) -> None:
        """One stacked forward over every member's batch, each stepping member's loss, one
        backward of their sum (a member's gradient is that of its own loss), every stepping
        member's optimizer step. A member whose loss stops it (early stopping, or a loss that
        is not finite) leaves ``stepping`` before its update, as a run's loop breaks."""
        x = torch.cat([augment(b[0], index) for augment, b in zip(augments, batches)])
        self.stack.train()
        for m in self.members:
            m.engine.optimizer.zero_grad(set_to_none=True)
        out = self.stack(x)
        losses, stepped = [], []
        for i in list(stepping):
            m, (_, y_B, idx_B) = self.members[i], batches[i]
            out_i = self.stack.member_output(out, i)
            loss, parts = model_loss(out_i, y_B, m.cfg.loss.kind)
            values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
            why = m.state.early_stop(values["loss"], m.cfg.train)
            if why and not math.isfinite(values["loss"]):
                why += " (the other stacked runs go on)"
            if why:
                stopped[i] = why
                stepping.remove(i)
                m.freeze()
                continue
            losses.append(loss)
            stepped.append((i, values, out_i, y_B, idx_B))
        if losses:
            torch.stack(losses).sum().backward()
            self.stack.share_gradients()
        for i, values, out_i, y_B, idx_B in stepped:
            m = self.members[i]
            m.engine.step()
            m.state.step += 1
            tallies[i].add(values, out_i, y_B, m.data.train.cluster[idx_B] if m.data.num_clusters else None)
            if m.bar is not None:
                m.bar.update(1)

    def _stop_preempted(self, running: list[int], outcomes: dict[int, EpochOutcome], seconds: float) -> None:
        """Checkpoint the interrupted members (a member that stopped in this epoch ends its run
        here, as it would have at the epoch's end), then raise Preempted."""
        for i in running:
            m = self.members[i]
            if outcomes[i].preempted:
                m.state.wall_seconds += seconds
                m.checkpoint()
                if m.writer is not None:
                    m.writer.close()
            else:
                m.end_epoch(outcomes[i], seconds)
                self._finish(m)
        self.preemption.uninstall()
        lead = self.members[running[0]]
        raise Preempted(self.preemption.agreed_signum, f"{len(running)} stacked runs' checkpoints "
                        f"({lead.run.checkpoints} ...)", lead.state.step)


def build_stacked_trainer(cfgs: Sequence[Config], dataset: Dataset | None = None,
                          mode: str | None = None) -> StackedTrainer:
    """A StackedTrainer for ``cfgs`` (one architecture and schedule: :func:`stack_key`); runs
    already finished are not trained again (their metrics are read back by ``fit``)."""
    _check_stack(cfgs)
    if world_size() > 1:
        raise ConfigError("stacked runs train in one process: start them without torchrun/accelerate launch "
                          "(expert parallelism does not compose with stacks)")
    finished = {i: RunDir(c.run_dir).read_metrics() for i, c in enumerate(cfgs) if RunDir(c.run_dir).finished(c)}
    order = [i for i in range(len(cfgs)) if i not in finished]
    if not order:
        return StackedTrainer([], None, finished, [])
    todo = [cfgs[i] for i in order]
    configure_process(todo[0])
    device, ctx = choose_device(todo[0]), ParallelContext.local()
    dataset = dataset if dataset is not None else load_data(todo[0])
    models, generators = [], []
    for cfg in todo:
        models.append(build_network(cfg, dataset, ctx).to(device))  # seeded by cfg.seed, as a run
        generators.append(_noise_generator(cfg, device))
    for model, generator in zip(models, generators):
        if hasattr(model, "dispatcher"):  # the member's evaluation draws its noise from it too
            model.dispatcher.generator = generator
    stack = stack_models(models, generators, mode)
    members = []
    for cfg, model, generator in zip(todo, models, generators):
        optimizer = build_optimizer(model, cfg)
        engine = MemberEngine(model, model, optimizer, ctx, device)
        data = build_run_data(cfg, dataset, ctx, device)
        members.append(MemberTrainer(cfg, RunDir(cfg.run_dir), engine, data, build_scheduler(optimizer, cfg),
                                     generator=generator))
    return StackedTrainer(members, stack, finished, order)


def _noise_generator(cfg: Config, device: torch.device) -> torch.Generator:
    """The generator a run's routing noise comes from, in the state a run alone would draw it
    in: on the CPU the default generator's state right after the model was built from
    ``cfg.seed``; on CUDA the device generator seeded by ``cfg.seed`` (model building draws
    on the CPU only)."""
    generator = torch.Generator(device=device)
    if device.type == "cuda":
        generator.manual_seed(cfg.seed)
    else:
        generator.set_state(torch.get_rng_state())
    return generator
