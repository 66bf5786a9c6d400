"""TensorBoard events of a run: one event stream in the run folder, written by the main rank.

Tags by namespace: ``train/*`` (epoch means of the loss parts, error, lr), ``eval/*``,
``moe/*`` (specialisation metrics, routing statistics, the selection-table figure),
``perf/step_seconds/*`` (every rank's mean step time, and their max and mean),
``perf/comm_bytes_per_step/*`` (bytes a rank sends to the others per step, by kind) and
``hparam/*`` with the hparams table at the end of the run.
"""

from __future__ import annotations

from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from moe_dist import fields
from moe_dist.config import Config, flatten, to_dict
from moe_dist.plots import selection_heatmap

__all__ = ["log_epoch", "log_final", "SummaryWriter"]



def log_epoch(writer: SummaryWriter, epoch: int, record: dict[str, Any], metrics: dict[str, Any] | None,
              lr: float, step_seconds_by_rank: list[float], class_names: list[str],
              comm_bytes_per_step: dict[str, float] | None = None) -> None:
    """One epoch's scalars (and the selection table when it was evaluated).
    ``comm_bytes_per_step``: the epoch's bytes sent per step and rank, by kind (several
    processes only)."""
    # Each value once: the tags of moe_dist/fields.py (the evaluation's copies in the record
    # have none: they are logged below as eval/*, moe/*); a new loss part gets train/<part>;
    # the task loss alone when it is the whole loss (no gate losses).
    tags, evaluated = fields.history_tags(), set(fields.history_eval_fields()) | {"test_error", "test_loss"}
    for k, v in record.items():
        if not isinstance(v, (int, float)) or k == "epoch" or k in evaluated:
            continue
        if k == "train_nll" and v == record.get("train_loss"):
            continue
        writer.add_scalar(tags.get(k) or f"train/{k.removeprefix('train_')}", v, epoch)
    writer.add_scalar("train/lr", lr, epoch)
    for rank, seconds in enumerate(step_seconds_by_rank):  # not in the history: timings differ
        writer.add_scalar(f"perf/step_seconds/rank{rank}", seconds, epoch)
    if step_seconds_by_rank:
        writer.add_scalar("perf/step_seconds/max", max(step_seconds_by_rank), epoch)
        writer.add_scalar("perf/step_seconds/mean", sum(step_seconds_by_rank) / len(step_seconds_by_rank), epoch)
    for kind, nbytes in (comm_bytes_per_step or {}).items():
        writer.add_scalar(f"perf/comm_bytes_per_step/{kind}", nbytes, epoch)
    if comm_bytes_per_step:
        writer.add_scalar("perf/comm_bytes_per_step/total", sum(comm_bytes_per_step.values()), epoch)
    if metrics is None:
        return
    for key, tag in fields.eval_scalar_tags().items():
        if key in metrics:
            writer.add_scalar(tag, metrics[key], epoch)
    if "selection_table" in metrics:
        fig = selection_heatmap(metrics["selection_table"], class_names, title=f"expert selection, epoch {epoch + 1}")
        writer.add_figure("moe/selection_table", fig, epoch)


def log_final(writer: SummaryWriter, cfg: Config, result: dict[str, Any]) -> None:
    """The hparams table and the final metrics, into the run's one event stream
    (``add_hparams`` would open a second file); closes the writer."""
    hparams = {k: v for k, v in flatten(to_dict(cfg)).items() if isinstance(v, (int, float, str, bool))}
    scalars = {f"hparam/{k}": result[k] for k in fields.hparam_fields() if isinstance(result.get(k), (int, float))}
    for summary in hparams_summary(hparams, scalars):
        writer.file_writer.add_summary(summary)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value)
    writer.close()
