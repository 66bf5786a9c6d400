"""The run folder: the one place that knows its layout and what "finished" means.

A run folder holds

* ``config.yaml``: the resolved config (written when training starts);
* ``checkpoints/``: ``epoch_NNNN[_step_SSSSSSSS].pt`` files and ``latest.json``, the pointer
  with each file's sha256 (:mod:`moe_dist.train.checkpoint`);
* TensorBoard event files and, for sweep jobs, ``train.log``;
* ``metrics.json``: the final metrics, written atomically and last. It is the completion
  marker: a run is finished when its ``metrics.json`` is complete, and a kill at any
  instant leaves either no ``metrics.json`` or a whole one.

``sweep``, ``distill``, the studies, ``report`` and ``eval`` all ask this module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from moe_dist.config import Config, check_resumable, from_dict, to_dict, upgrade_saved
from moe_dist.errors import CheckpointError, MoEDistError
from moe_dist.train import checkpoint

__all__ = ["RunDir", "find_finished_runs"]

CONFIG = "config.yaml"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
#: metrics.json layout. 2: epochs numbered from 1 (``history[].epoch`` = epochs completed,
#: ``stopped_early_at`` the epoch in which it fired), ``train_seconds`` and ``total_seconds``.
#: Files without ``format`` are version 1 (epochs from 0, ``wall_seconds`` = training time)
#: and are read as version 2.
METRICS_FORMAT = 2


class RunDir:
    """A run folder (it need not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    # ------------------------------------------------------------------ start and config
    def prepare(self) -> list[Path]:
        """Create the folder and delete the temporary files a killed write left behind
        (there and in checkpoints/); returns what was deleted. Main rank, before writing."""
        self.path.mkdir(parents=True, exist_ok=True)
        return checkpoint.remove_stale_temporaries(self.path) + checkpoint.remove_stale_temporaries(self.checkpoints)

    def is_run(self) -> bool:
        """Whether the folder holds a run (its config.yaml)."""
        return self.config_path.is_file()

    def write_config(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(self.config_path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())

    def read_config_dict(self) -> dict[str, Any]:
        """The saved config as a nested dict, renamed values given their current names."""
        if not self.is_run():
            raise MoEDistError(f"{self.path} is not a run folder (no {CONFIG})")
        try:
            data = yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MoEDistError(f"{self.config_path}: not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise MoEDistError(f"{self.config_path}: the top level must be a mapping of sections")
        return upgrade_saved(data)

    def read_config(self) -> Config:
        """The saved config, validated (a key unknown to this version is an error)."""
        return from_dict(self.read_config_dict())

    # ------------------------------------------------------------------ metrics and completion
    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Write metrics.json atomically: the last file a finished run writes."""
        self.path.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(self.metrics_path, json.dumps(metrics, indent=1).encode())

    def read_metrics(self) -> dict[str, Any]:
        try:
            data = json.loads(self.metrics_path.read_text())
        except FileNotFoundError:
            raise MoEDistError(f"{self.path} has no {METRICS}: the run has not finished") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoEDistError(f"{self.metrics_path} is not valid JSON ({exc}): "
                               "a run killed while writing it; run it again to finish") from None
        if not isinstance(data, dict):
            raise MoEDistError(f"{self.metrics_path} does not hold a JSON object")
        return upgrade_metrics(data)

    def finished(self, cfg: Config | None = None) -> bool:
        """Whether the run is finished: its metrics.json is complete. With ``cfg``, also that
        it is ``cfg``'s run to its ``train.epochs``: a run whose epochs were raised is not
        finished (training extends it), and a run of another config is refused with
        ConfigError, as training would refuse to resume it."""
        if not self.metrics_path.is_file():
            return False
        try:
            self.read_metrics()
        except MoEDistError:
            return False  # a metrics.json from before writes were atomic, cut short
        if cfg is None:
            return True
        if not self.is_run():
            return False  # nothing to compare with: not cfg's run to trust
        saved = self.read_config()
        check_resumable(saved, cfg, str(self.path), finished=True)
        return saved.train.epochs == cfg.train.epochs

    # ------------------------------------------------------------------ checkpoints
    def has_checkpoint(self) -> bool:
        """Whether a checkpoint pointer exists (training would resume; loading verifies it)."""
        return (self.checkpoints / checkpoint.LATEST).is_file()

    def save_checkpoint(self, payload: dict[str, Any], epoch: int, step: int | None = None,
                        keep: int = 2) -> Path:
        return checkpoint.save_checkpoint(self.checkpoints, epoch, payload, keep=keep, step=step)

    def load_checkpoint(self, map_location: str | torch.device = "cpu",
                        on_skip: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        """The newest checkpoint that verifies (sha256), or None when there is none yet;
        ``on_skip`` hears about every damaged newer one that was passed over."""
        return checkpoint.load_checkpoint(self.checkpoints, map_location=map_location, on_skip=on_skip)

    def has_checkpoint_files(self) -> bool:
        """Whether any checkpoint file is there, valid or not."""
        return bool(checkpoint.checkpoint_files(self.checkpoints))

    def clear(self) -> None:
        """Remove what a run writes (``--overwrite``): config, metrics, checkpoints, events."""
        if self.checkpoints.is_dir():
            shutil.rmtree(self.checkpoints)
        for path in (self.config_path, self.metrics_path, *self.path.glob("events.out.tfevents.*")):
            path.unlink(missing_ok=True)

    def latest_weights(self) -> dict[str, torch.Tensor]:
        """The model state dict (full expert layout) of the latest checkpoint."""
        payload = self.load_checkpoint()
        if payload is None:
            raise CheckpointError(f"{self.path} has no checkpoint in {self.checkpoints}")
        return payload["model"]


def upgrade_metrics(data: dict[str, Any]) -> dict[str, Any]:
    """A metrics.json of an older format in the current one (METRICS_FORMAT), so old and new
    runs read alike: epochs renumbered from 1, ``wall_seconds`` named ``train_seconds``."""
    if data.get("format", 1) >= METRICS_FORMAT:
        return data
    data = dict(data, format=METRICS_FORMAT)
    data["history"] = [dict(h, epoch=h["epoch"] + 1) if "epoch" in h else h for h in data.get("history", [])]
    if data.get("stopped_early_at") is not None:
        data["stopped_early_at"] += 1
    if "wall_seconds" in data:
        data["train_seconds"] = data.pop("wall_seconds")
    return data


def find_finished_runs(paths: Iterable[str | Path]) -> Iterator[RunDir]:
    """Every finished run folder at or below ``paths`` (each once, in path order)."""
    seen: set[Path] = set()
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise MoEDistError(f"{root} is not a folder (give run folders or folders holding them)")
        for metrics_path in sorted(root.rglob(METRICS)):
            run = RunDir(metrics_path.parent)
            if run.path.resolve() not in seen and run.finished():
                seen.add(run.path.resolve())
                yield run
