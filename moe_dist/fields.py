"""Every field a run's ``metrics.json`` can hold: one entry each, with its unit, its meaning
and where it is used (the CLI summary, TensorBoard, the papers' published values, reports).

Code that lists metric names asks this module instead of keeping its own list, so a new
metric is added here once. Fields live in one of four records:

- ``metrics``: the top level of ``metrics.json`` (``Trainer.finish``);
- ``history``: each per-epoch record of ``history`` (``Trainer.fit`` / ``train_epoch``);
- ``conditional``: what ``moe-dist distill`` adds under ``conditional``;
- ``conditional.top{k}``: one record per k of the distilled gate's top-k evaluation.

Entries are in the order the trainer writes them; the helpers return names in that order.
``README.md`` holds the same table (``markdown_field_table()``); tests/test_fields.py keeps
the two in step and checks committed ``metrics.json`` files against the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from moe_dist.tables import markdown_table

METRICS, HISTORY, CONDITIONAL, TOPK = "metrics", "history", "conditional", "conditional.top{k}"
RECORDS = (METRICS, HISTORY, CONDITIONAL, TOPK)


@dataclass(frozen=True)
class Field:
    key: str
    """The key inside its record."""
    record: str
    """metrics | history | conditional | conditional.top{k} (module docstring)."""
    unit: str
    """fraction, bits, nats, s, MB, bytes, count, or - (none: a loss, a name, a list, a flag)."""
    meaning: str
    """One line, for README's table."""
    eval_key: str | None = None
    """The key of the test-set evaluation (``Trainer.evaluate()``) the value is copied from."""
    summary: bool = False
    """Shown in the CLI summary table (``moe-dist train``, ``eval``, ``distill``)."""
    tensorboard: str | None = None
    """Its TensorBoard tag: history fields each epoch, metrics fields at each evaluation."""
    hparam: bool = False
    """Logged as ``hparam/<key>`` with the hparams table at the end of a run."""
    paper: bool = False
    """moe_dist/paper.py holds published values of it."""
    report: tuple[str, ...] = ()
    """Aggregates over a row's runs in ``report.csv`` (columns ``<key>_<aggregate>``)."""
    section4: bool = False
    """A column of the Section 4.2 summary (``moe-dist study pretrained-gate``)."""

    @property
    def path(self) -> str:
        """Where it sits in metrics.json: ``test_error``, ``history[].test_error``, ..."""
        if self.record == METRICS:
            return self.key
        return f"{'history[]' if self.record == HISTORY else self.record}.{self.key}"


_M, _H, _C, _K = METRICS, HISTORY, CONDITIONAL, TOPK  # short names for the table below

#: The registry, in the order the trainer writes the fields.
FIELDS: tuple[Field, ...] = (
    Field("test_error", _M, "fraction", "error (1 - accuracy) of the final model on the whole test set",
          eval_key="error", summary=True, tensorboard="eval/error", hparam=True, paper=True, section4=True),
    Field("test_loss", _M, "-", "the training objective (task loss in nats + weighted gate losses) on the test set",
          eval_key="loss", tensorboard="eval/loss"),
    Field("train_error", _M, "fraction", "error of the final model on the whole training set",
          summary=True, hparam=True, paper=True),
    Field("train_loss", _M, "-", "the training objective of the final model on the whole training set"),
    Field("final_train_loss", _M, "-", "mean batch loss of the last epoch (history[-1].train_loss)",
          paper=True, section4=True),
    Field("mutual_information", _M, "bits", "I(E;Y): top-gated expert vs true label (docs/papers.md A.7)",
          eval_key="mutual_information", summary=True, tensorboard="moe/mutual_information", hparam=True,
          paper=True, report=("mean",), section4=True),
    Field("mutual_information_predicted", _M, "bits",
          "I(E;Y) with the chosen expert's predicted class, the published code's variant",
          eval_key="mutual_information_predicted", tensorboard="moe/mutual_information_predicted",
          report=("mean",)),
    Field("sample_entropy", _M, "bits", "H_s: mean entropy of each sample's gate distribution",
          eval_key="sample_entropy", summary=True, tensorboard="moe/sample_entropy", hparam=True, paper=True,
          report=("mean",), section4=True),
    Field("usage_entropy", _M, "bits", "H_u: entropy of the gate distribution averaged over the test set",
          eval_key="usage_entropy", summary=True, tensorboard="moe/usage_entropy", hparam=True, paper=True,
          report=("mean",), section4=True),
    Field("selection_table", _M, "count", "experts x classes: test samples whose top-gated expert is e",
          eval_key="selection_table"),
    Field("soft_selection_table", _M, "-", "experts x classes: gate probabilities summed over the test samples",
          eval_key="soft_selection_table"),
    Field("per_expert_accuracy", _M, "fraction", "accuracy on the test samples each expert is top-gated for "
          "(null: none)", eval_key="per_expert_accuracy"),
    Field("samples_per_expert", _M, "count", "test samples whose top-gated expert is e",
          eval_key="samples_per_expert"),
    Field("experts_used", _M, "count", "experts top-gated for more than 1% of the test samples",
          eval_key="experts_used", summary=True, tensorboard="moe/experts_used"),
    Field("group_mutual_information", _M, "bits", "hierarchical routing: I(G;Y), top-gated group vs true label",
          eval_key="group_mutual_information", summary=True, tensorboard="moe/group_mutual_information",
          report=("mean",)),
    Field("group_sample_entropy", _M, "bits", "hierarchical routing: H_s of the group gate p(g)",
          eval_key="group_sample_entropy", tensorboard="moe/group_sample_entropy", report=("mean",)),
    Field("group_usage_entropy", _M, "bits", "hierarchical routing: H_u of the group gate p(g)",
          eval_key="group_usage_entropy", summary=True, tensorboard="moe/group_usage_entropy", report=("mean",)),
    Field("group_selection_table", _M, "count", "hierarchical routing: groups x classes, test samples whose "
          "top-gated group is g", eval_key="group_selection_table"),
    Field("group_soft_selection_table", _M, "-", "hierarchical routing: groups x classes, p(g) summed over "
          "the test samples", eval_key="group_soft_selection_table"),
    Field("samples_per_group", _M, "count", "hierarchical routing: test samples whose top-gated group is g",
          eval_key="samples_per_group"),
    Field("groups_used", _M, "count", "hierarchical routing: groups top-gated for more than 1% of the test samples",
          eval_key="groups_used", tensorboard="moe/groups_used"),
    Field("dispatch_entropy", _M, "nats", "synthetic data: H(cluster | expert) of the last epoch's training "
          "dispatch (docs/papers.md B.4)", summary=True, paper=True, report=("mean", "std")),
    Field("test_dispatch_entropy", _M, "nats", "synthetic data: the dispatch entropy of the test set",
          eval_key="dispatch_entropy", tensorboard="moe/test_dispatch_entropy"),
    Field("epochs_completed", _M, "count", "epochs trained"),
    Field("stopped_early_at", _M, "-", "the epoch (from 1) in which early stopping fired or the training "
          "loss stopped being finite (the run diverged; the log says which), null if never"),
    Field("steps", _M, "count", "optimizer steps taken"),
    Field("train_seconds", _M, "s", "training time (the epochs' steps) summed over every session of the run; "
          "older files call it wall_seconds", summary=True, report=("mean",)),
    Field("total_seconds", _M, "s", "wall time of every session of the run: set-up, data, training, "
          "evaluation, checkpoints", summary=True),
    Field("step_seconds", _M, "s", "train_seconds / steps", report=("mean",)),
    Field("peak_memory_mb", _M, "MB", "peak accelerator memory, on CPU the process's peak resident set",
          report=("max",)),
    Field("hardware", _M, "-", "the GPU, or the CPU model and threads"),
    Field("num_processes", _M, "count", "processes (ranks) that trained the run"),
    Field("engine", _M, "-", "the config's engine"),
    Field("ep_size", _M, "count", "ranks sharing the experts of one MoE (expert parallelism)"),
    Field("comm_bytes_per_step", _M, "bytes", "several processes only: bytes one rank sends to the others per "
          "training step (mean over the ranks and this session's steps), by kind: dispatch (experts' inputs, outputs, their gradients), "
          "gradients (all-reduce), other (gate losses, BatchNorm, layouts), total; an all-reduce counts as a ring, "
          "2(P-1)/P x its size (a model); engine=deepspeed's own reductions are not counted"),
    Field("torch", _M, "-", "torch version"),
    Field("format", _M, "-", "metrics.json layout (2: epochs from 1, train_seconds; older files read as 2)"),
    Field("history", _M, "-", "one record per epoch (the history[] rows)"),
    Field("conditional", _M, "-", "distill only: the top-k evaluations of the distilled gate (conditional.* rows)"),
    Field("experts_unchanged", _M, "-",
          "distill only: whether the frozen experts are bit-identical to the source run's"),
    Field("stack_members", _M, "count", "runs trained with it as one stack (moe-dist stack, train --seeds, "
          "sweep --stack); absent: trained alone. Its times are the stack's"),

    Field("epoch", _H, "-", "the epoch, from 1: epochs completed (its checkpoint is epoch_000N.pt, "
          "its TensorBoard step N)"),
    Field("train_loss", _H, "-", "mean batch loss of the epoch (the training objective)", tensorboard="train/loss"),
    Field("train_nll", _H, "nats", "mean batch task loss (mixture NLL or cross-entropy)", tensorboard="train/nll"),
    Field("train_importance", _H, "-", "mean batch L_cv, weighted (when loss.importance_weight > 0)",
          tensorboard="train/importance"),
    Field("train_sample_similarity", _H, "-", "mean batch L_s, weighted (when loss.ls_beta or ls_gamma > 0)",
          tensorboard="train/sample_similarity"),
    Field("drop_rate", _H, "fraction", "top-k with moe.capacity_factor > 0: routed pairs dropped over capacity",
          tensorboard="moe/drop_rate"),
    Field("padding_ratio", _H, "fraction", "top-k with moe.capacity_factor > 0: padded expert-batch rows "
          "that carry no sample", tensorboard="moe/padding_ratio"),
    Field("remote_rows_per_step", _H, "count", "top-k/hierarchical under expert parallelism: sample rows the "
          "ranks together sent to other ranks per step (forward dispatch; the outputs come back as many)",
          tensorboard="moe/remote_rows_per_step"),
    Field("min_remote_rows_per_step", _H, "count", "the same, had each sample gone once to each other rank "
          "holding one of its chosen experts (the routing's minimum)", tensorboard="moe/min_remote_rows_per_step"),
    Field("train_error", _H, "fraction", "error of the epoch's training forward passes",
          tensorboard="train/error"),
    Field("dispatch_entropy", _H, "nats", "synthetic data: dispatch entropy of the epoch's training forward passes",
          tensorboard="moe/dispatch_entropy"),
    Field("epoch_seconds", _H, "s", "wall time of the epoch", tensorboard="train/epoch_seconds"),
    # Copies of the epoch's evaluation: TensorBoard has them once, under eval/* and moe/*.
    Field("test_error", _H, "fraction", "evaluated epochs: test error", eval_key="error"),
    Field("test_loss", _H, "-", "evaluated epochs: test objective", eval_key="loss"),
    Field("sample_entropy", _H, "bits", "evaluated epochs: H_s", eval_key="sample_entropy"),
    Field("usage_entropy", _H, "bits", "evaluated epochs: H_u", eval_key="usage_entropy"),
    Field("mutual_information", _H, "bits", "evaluated epochs: I(E;Y)", eval_key="mutual_information"),
    Field("experts_used", _H, "count", "evaluated epochs: experts used", eval_key="experts_used"),
    Field("group_mutual_information", _H, "bits", "evaluated epochs, hierarchical routing: I(G;Y)",
          eval_key="group_mutual_information"),
    Field("group_usage_entropy", _H, "bits", "evaluated epochs, hierarchical routing: H_u of the groups",
          eval_key="group_usage_entropy"),

    Field("dense_eval_seconds", _C, "s", "time of one (warm) dense evaluation of the test set"),
    Field("test_error", _K, "fraction", "test error with top-k routing (only k experts run per sample)",
          eval_key="error"),
    Field("expert_flops_fraction", _K, "fraction", "routed (sample, expert) pairs / (samples x E): the share "
          "of the dense expert compute"),
    Field("routed_pairs_per_expert", _K, "count", "routed (sample, expert) pairs per expert"),
    Field("mutual_information", _K, "bits", "I(E;Y) under top-k routing", eval_key="mutual_information"),
    Field("usage_entropy", _K, "bits", "H_u under top-k routing", eval_key="usage_entropy"),
    Field("eval_seconds", _K, "s", "time of the (warm) top-k evaluation of the test set"),
)
_BY_PATH = {(f.record, f.key): f for f in FIELDS}


def fields(record: str | None = None) -> tuple[Field, ...]:
    """Every field, or those of one record, in the order the trainer writes them."""
    if record is not None and record not in RECORDS:
        raise ValueError(f"record {record!r} is not one of: {', '.join(RECORDS)}")
    return tuple(f for f in FIELDS if record is None or f.record == record)


def field(key: str, record: str = METRICS) -> Field:
    """The entry of ``key`` in ``record``; KeyError naming it when there is none."""
    try:
        return _BY_PATH[(record, key)]
    except KeyError:
        raise KeyError(f"{key!r} is not a field of {record} records (moe_dist/fields.py)") from None


def names(*keys: str, record: str = METRICS) -> tuple[str, ...]:
    """``keys`` checked against the registry: for outputs whose column order is their own
    (a study's table), so a misspelt or removed field fails at import, not in a late report."""
    return tuple(field(k, record).key for k in keys)


def summary_fields() -> tuple[str, ...]:
    """The rows of the CLI summary table (``moe_dist.paper.format_summary``)."""
    return tuple(f.key for f in fields(METRICS) if f.summary)


def final_eval_fields() -> tuple[str, ...]:
    """Keys ``Trainer.finish`` copies unchanged from the final test evaluation into metrics.json
    when the evaluation has them (a single model has no MoE keys)."""
    return tuple(f.key for f in fields(METRICS) if f.eval_key == f.key)


def history_eval_fields() -> tuple[str, ...]:
    """Keys ``Trainer.fit`` copies unchanged from an epoch's evaluation into its history record."""
    return tuple(f.key for f in fields(HISTORY) if f.eval_key == f.key)


def eval_scalar_tags() -> dict[str, str]:
    """Evaluation key -> TensorBoard tag of the scalars logged at each evaluation
    (``error`` -> ``eval/error``, ``dispatch_entropy`` -> ``moe/test_dispatch_entropy``, ...)."""
    return {f.eval_key: f.tensorboard for f in fields(METRICS) if f.eval_key and f.tensorboard}


def history_tags() -> dict[str, str]:
    """History key -> TensorBoard tag of the scalars logged from each epoch's record."""
    return {f.key: f.tensorboard for f in fields(HISTORY) if f.tensorboard}


def hparam_fields() -> tuple[str, ...]:
    """The final metrics logged as ``hparam/<key>`` next to the hparams table."""
    return tuple(f.key for f in fields(METRICS) if f.hparam)


def paper_fields() -> tuple[str, ...]:
    """The fields moe_dist/paper.py holds published values of."""
    return tuple(f.key for f in fields(METRICS) if f.paper)


def report_aggregates() -> tuple[tuple[str, str], ...]:
    """(key, aggregate) of the report.csv columns ``<key>_<aggregate>`` (mean, std, max)."""
    return tuple((f.key, agg) for f in fields(METRICS) for agg in f.report)


def section4_fields() -> tuple[str, ...]:
    """The columns of the Section 4.2 summary, in its order (docs/papers.md A.6)."""
    return tuple(f.key for f in fields(METRICS) if f.section4)


def _uses(f: Field) -> str:
    uses = [name for name, on in (("summary", f.summary), ("hparam", f.hparam), ("paper", f.paper),
                                  ("report", bool(f.report)), ("section 4.2", f.section4)) if on]
    if f.tensorboard:
        uses.append(f"`{f.tensorboard}`")
    return ", ".join(uses)


def markdown_field_table(records: Iterable[str] = RECORDS) -> str:
    """README's table of metrics.json fields: path, unit, meaning, where it is used."""
    rows = [(f"`{f.path}`", f.unit, f.meaning, _uses(f)) for record in records for f in fields(record)]
    return markdown_table(("field", "unit", "meaning", "used in"), rows)
