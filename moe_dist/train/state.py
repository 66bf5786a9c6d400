"""The training state a checkpoint carries besides weights and optimizer, and early stopping."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from moe_dist.config import TrainConfig

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    min_loss: float = math.inf  # for Chen et al.'s early stopping (docs/papers.md B.3)
    stopped_early: int = -1  # index (from 0) of the epoch in which early stopping fired, -1 if never
    wall_seconds: float = 0.0  # training time (the epochs' steps) summed over all sessions of the run
    total_seconds: float = 0.0  # wall time of every session, as of its last checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)
    # A run preempted mid-epoch (moe_dist.train.preemption) resumes epoch `epoch` at batch
    # `batch` with the running sums of the batches before it (moe_dist.train.tally).
    batch: int = 0
    partial: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        # JSON keeps a checkpoint loadable with weights_only=True (no custom classes, no inf).
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))

    def early_stop(self, loss: float, train: TrainConfig) -> str | None:
        """Why training stops on this step's training loss, or None: a loss that is not finite
        (the run diverged: its update would only spread NaN through the weights), or Chen et
        al.'s early stopping (docs/papers.md B.3). Checked before the step's update as their
        loop does, else the loss counts towards the minimum. The loss is the global batch's:
        every rank decides alike."""
        if not math.isfinite(loss):
            return f"training loss is {loss}: the run diverged"
        if not (train.early_stop_rise or train.early_stop_loss):
            return None
        if self.epoch >= train.early_stop_after:
            if train.early_stop_rise and loss > self.min_loss + train.early_stop_rise:
                return (f"training loss {loss:.4f} rose more than train.early_stop_rise={train.early_stop_rise} "
                        f"above its minimum {self.min_loss:.4f}")
            if train.early_stop_loss and loss <= train.early_stop_loss:
                return f"training loss {loss:.4f} <= train.early_stop_loss={train.early_stop_loss}"
        self.min_loss = min(self.min_loss, loss)
        return None
