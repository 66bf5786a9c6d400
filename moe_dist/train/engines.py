"""Engines: the ways a loss becomes a parameter update, chosen in one place (:func:`build_engine`).

* :class:`LocalEngine`: one process (``engine: moe_dist``). accelerate supplies device
  placement, autocast and the fp16 loss scaler.
* :class:`ExpertParallelEngine`: several processes (``engine: moe_dist``). Experts are
  sharded over ``parallel.ep_size`` ranks, so DDP (and accelerate, which would wrap the
  model in it) cannot be used: DDP would all-reduce different experts into each other.
  moe_dist's :class:`~moe_dist.parallel.GradientReducer` sums gradients over the right
  groups instead (docs/design.md, choice 5).
* :class:`DeepSpeedEngine`: ``engine: deepspeed`` (ZeRO 0-2); DeepSpeed reduces and steps.

Every engine has one handle for what forward is called on (``network``; call the engine
itself) and one for the bare model (``module``: parameters, state dicts, freezing).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from moe_dist.config import Config
from moe_dist.errors import ConfigError
from moe_dist.parallel import (GradientReducer, ParallelContext, full_model_state, full_optimizer_state,
                               load_full_model_state, load_full_optimizer_state)
from moe_dist.parallel.state import gather_optimizer_state, slice_optimizer_state

__all__ = ["mixed_precision_autocast", "Engine", "LocalEngine", "ExpertParallelEngine", "DeepSpeedEngine", "build_engine"]


def mixed_precision_autocast(mixed_precision: str, device: torch.device) -> ContextManager:
    """The autocast region of ``train.mixed_precision`` (what accelerate's autocast does): the
    gate and its losses opt out inside the model, so they stay float32."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Engine:
    """Forward through ``network``; :meth:`update` turns this rank's loss into a step."""

    def __init__(self, network: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer,
                 ctx: ParallelContext, device: torch.device) -> None:
        self.network = network  # what forward is called on (a wrapper, or the model itself)
        self.module = module  # the bare model
        self.optimizer = optimizer
        self.ctx = ctx
        self.device = device

    def __call__(self, x: torch.Tensor) -> Any:
        return self.network(x)

    def train(self, mode: bool = True) -> None:
        self.network.train(mode)

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()

    def update(self, loss: torch.Tensor) -> None:
        """Backward of this rank's loss share, gradient reduction, optimizer step."""
        raise NotImplementedError

    def model_state(self) -> dict[str, torch.Tensor]:
        """Every expert's weights in the single-process layout (collective when sharded)."""
        return full_model_state(self.module, self.ctx)

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load full-layout weights (a checkpoint's ``model``, any ep_size) into this rank's part."""
        load_full_model_state(self.module, state, self.ctx)

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer state in the single-process layout (collective when sharded)."""
        return full_optimizer_state(self.optimizer, self.module, self.ctx)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        load_full_optimizer_state(self.optimizer, self.module, state, self.ctx)

    def scheduler_state(self, scheduler: Any) -> dict[str, Any]:
        """The LR scheduler's state, per-group values in the native engine's group order."""
        return scheduler.state_dict()

    def load_scheduler_state(self, scheduler: Any, state: dict[str, Any]) -> None:
        scheduler.load_state_dict(state)


class LocalEngine(Engine):
    """One process: ``accelerator.prepare`` wraps model and optimizer for mixed precision."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, accelerator: Any) -> None:
        network, optimizer = accelerator.prepare(model, optimizer)
        super().__init__(network, accelerator.unwrap_model(network), optimizer, ParallelContext.local(),
                         accelerator.device)
        self.accelerator = accelerator

    def autocast(self) -> ContextManager:
        return self.accelerator.autocast()

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)  # fp16: scaled, unscaled by the prepared optimizer
        self.optimizer.step()


class ExpertParallelEngine(Engine):
    """Several processes, gradients summed by moe_dist (no DDP); bf16 autocast or float32."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext,
                 device: torch.device, mixed_precision: str) -> None:
        super().__init__(model, model, optimizer, ctx, device)
        self.reduce_gradients = GradientReducer(model, ctx)
        self.mixed_precision = mixed_precision

    def autocast(self) -> ContextManager:
        return mixed_precision_autocast(self.mixed_precision, self.device)

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.reduce_gradients()
        self.optimizer.step()


class DeepSpeedEngine(Engine):
    """DeepSpeed reduces the gradients (its expert groups) and may shard the optimizer (ZeRO).
    Checkpoints hold the optimizer state in the native engine's layout (``native_groups``;
    moe_dist.parallel.deepspeed_engine), so either engine resumes the other's runs."""

    def __init__(self, engine: Any, model: nn.Module, optimizer: torch.optim.Optimizer, native_groups: Any,
                 ctx: ParallelContext, device: torch.device) -> None:
        super().__init__(engine, model, optimizer, ctx, device)
        self.native_groups = native_groups
        self.native_params = [p for _, params in native_groups for p in params]

    def update(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over the N ranks; our loss is a share (module doc of
        # moe_dist.parallel.deepspeed_engine): N * share makes the average a sum.
        self.network.backward(loss * self.ctx.world_size)
        self.network.step()  # also zeroes the gradients

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        from moe_dist.parallel.deepspeed_engine import refresh_master_weights

        super().load_model_state(state)
        refresh_master_weights(self.network)

    def optimizer_state(self) -> dict[str, Any]:
        from moe_dist.parallel.deepspeed_engine import native_optimizer_state

        local = native_optimizer_state(self.network, self.optimizer, self.native_groups)
        return gather_optimizer_state(local, self.native_params, self.module, self.ctx)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        from moe_dist.parallel.deepspeed_engine import load_native_optimizer_state

        local = slice_optimizer_state(state, self.native_params, self.module, self.ctx)
        load_native_optimizer_state(self.network, self.optimizer, self.native_groups, local)

    def scheduler_state(self, scheduler: Any) -> dict[str, Any]:
        from moe_dist.parallel.deepspeed_engine import native_scheduler_state

        return native_scheduler_state(scheduler.state_dict(), self.network, self.optimizer, self.native_groups)

    def load_scheduler_state(self, scheduler: Any, state: dict[str, Any]) -> None:
        from moe_dist.parallel.deepspeed_engine import deepspeed_scheduler_state

        scheduler.load_state_dict(deepspeed_scheduler_state(state, self.network, self.optimizer, self.native_groups))


def _accelerator(cfg: Config, cpu: bool) -> Any:
    # accelerate imports deepspeed when it is installed, and deepspeed then logs an accelerator
    # detection warning on stdout (breaking `moe-dist eval --json`) unless told the accelerator;
    # without CUDA that is the CPU.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses a second Accelerator with another
    # precision; procedures (study, distill, tests) build several trainers in one process.
    # No public API resets it (accelerate 1.x).
    AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision)


def build_engine(cfg: Config, model: nn.Module, ctx: ParallelContext, device: torch.device,
                 build_optimizer: Callable[..., torch.optim.Optimizer]) -> Engine:
    """The engine ``cfg`` and the process count call for, around an already parallelized
    ``model``. ``build_optimizer(model, split_groups=None)`` makes its optimizer."""
    if cfg.engine == "deepspeed":
        from moe_dist.parallel.deepspeed_engine import build_engine as build_deepspeed

        engine, optimizer, native_groups = build_deepspeed(
            model.to(device), lambda split_groups: build_optimizer(model, split_groups), cfg.parallel.zero_stage,
            ctx.ep_size)
        return DeepSpeedEngine(engine, model, optimizer, native_groups, ctx, device)
    if ctx.distributed:
        if cfg.train.mixed_precision == "fp16":
            raise ConfigError("train.mixed_precision='fp16' is not supported with several processes "
                              "(per-rank loss scaling would desynchronise the ranks); use bf16")
        model = model.to(device)
        return ExpertParallelEngine(model, build_optimizer(model), ctx, device, cfg.train.mixed_precision)
    model = model.to(device)
    return LocalEngine(model, build_optimizer(model), _accelerator(cfg, device.type == "cpu"))
