"""``moe-dist distill``: a softmax gate distilled from an attentive MoE (paper-spec A.8, section 5.1).

The attentive gate needs every expert's hidden state, so it cannot route before the experts
run. Distillation keeps the trained experts fixed and trains an ordinary softmax gate on
them: the gate trunk (conv/bn/fc1/fc2) is copied by name from the attentive gate, the
softmax gate's ``out`` layer starts fresh and W_q/W_k are dropped (the trainer's
``train.init_from`` matches names, the paper's ``strict=False`` copy), the experts are
frozen and no regulariser is applied. The distilled gate can then route conditionally:
the run is re-evaluated in top-k mode, where only k of the E experts run per sample,
which is the compute saving the paper argues for.

Under a launcher (``torchrun --nproc_per_node N -m moe_dist.cli distill ...``) every rank
runs the procedure: the process group is held for its whole length (the distillation and the
top-k evaluations are separate trainers), evaluation counts are summed over ranks and only
rank 0 writes; the results equal a single process's (MNIST-family architectures, no BatchNorm).

Also holds small helpers the other procedures (pretrained.py, study.py) share: reading a
run's latest weights, comparing a model part between checkpoints, comma-separated CLI lists.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_dist.config import Config, load_config, validate
from moe_dist.errors import CheckpointError, ConfigError, MoEDistError

if TYPE_CHECKING:  # torch is imported where it is used, so building the CLI parser stays fast
    import torch
    from torch import nn

#: State-dict prefixes of the two model parts that train.freeze / train.init_parts name.
PART_PREFIXES = {"experts": ("experts.",), "gate": ("gate.", "attention.")}
#: Keys the distillation sets itself (A.8); an override of one of them would be ignored.
DISTILL_KEYS = ("moe.routing", "loss.importance_weight", "loss.ls_beta", "loss.ls_gamma",
                "train.init_from", "train.init_parts", "train.freeze")
#: Source and distilled model must agree on these, or the copied weights mean nothing.
MATCHING_KEYS = ("data.name", "data.classes", "model.arch", "model.kind", "moe.num_experts")


# ------------------------------------------------------------------ helpers shared by the procedures

def comma_ints(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``: the argparse type of the procedures' list options."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


class IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser that takes options between positionals, as in
    ``distill SOURCE_RUN --config FILE key=value ...``: argparse before Python 3.13 stops
    filling positionals at the first option and rejects the overrides after it. Leaf
    parsers only (argparse's intermixed parsing does not support subparsers)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._intermixing:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_leaf_parser(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """``subparsers.add_parser`` returning an :class:`IntermixedParser` (the top-level
    subparsers of cli.py create plain parsers; this one adds no state, so it is re-classed)."""
    parser = subparsers.add_parser(name, **kwargs)
    parser.__class__ = IntermixedParser
    return parser


def reject_overrides(overrides: Iterable[str], keys: Iterable[str], why: str) -> None:
    """Refuse overrides of keys a procedure sets itself, rather than silently ignore them."""
    owned = set(keys)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in owned:
            raise ConfigError(f"override {item!r}: {key} is set by this procedure ({why})")


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted keys set (``{"train.freeze": ["gate"]}``);
    typed values, so paths need no quoting as ``key=value`` overrides would."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in values.items():
        *path, leaf = dotted.split(".")
        target: Any = cfg
        for part in path:
            target = getattr(target, part, None)
        if target is None or not hasattr(target, leaf):
            raise ConfigError(f"unknown config key {dotted!r}")
        setattr(target, leaf, value)
    return validate(cfg)


def latest_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a run folder's latest (sha256-verified) checkpoint."""
    from moe_dist.train.checkpoint import load_checkpoint

    payload = load_checkpoint(Path(run_dir) / "checkpoints")
    if payload is None:
        raise CheckpointError(f"{run_dir} has no checkpoint in {run_dir}/checkpoints")
    return payload["model"]


def part_parameter_names(model: nn.Module, part: str) -> list[str]:
    """Names of the trainable parameters of ``part`` (experts | gate). BatchNorm running
    statistics are buffers, not parameters: frozen parts still update them in train mode,
    as the reference code's do (paper-spec A.8 step 1), so freezing checks leave them out."""
    return [n for n, _ in model.named_parameters() if n.startswith(PART_PREFIXES[part])]


def tensors_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: Iterable[str]) -> bool:
    """Whether every named tensor is present in both and bit-identical."""
    import torch

    names = list(names)
    return bool(names) and all(n in a and n in b and torch.equal(a[n].cpu(), b[n].cpu()) for n in names)


def model_state(trainer: Any) -> dict[str, torch.Tensor]:
    """A CPU copy of a Trainer's current model state dict, every expert included (what its
    next checkpoint would hold). Collective when experts are sharded: call it on every rank."""
    from moe_dist.parallel import full_model_state

    return {k: v.detach().cpu().clone() for k, v in full_model_state(trainer.module, trainer.ctx).items()}


def is_complete(cfg: Config) -> bool:
    """Whether ``cfg``'s run has finished (metrics.json is written last), so a procedure
    can skip it. A finished run with another config is refused, as the trainer refuses to
    resume one; a run whose ``train.epochs`` was raised is not finished (the trainer extends it)."""
    from moe_dist.train.trainer import RESUMABLE_CHANGES, config_differences

    run_dir = Path(cfg.run_dir)
    if not (run_dir / "metrics.json").exists():
        return False
    saved = load_config(run_dir / "config.yaml")
    changed = [k for k in config_differences(saved, cfg) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(f"{run_dir} holds a finished run with a different config ({', '.join(changed)}); "
                          "use another root folder")
    return saved.train.epochs == cfg.train.epochs


# ------------------------------------------------------------------ distillation

def distilled_name(source_name: str) -> str:
    """``mnist/attentive_lcv`` -> ``mnist/distilled_lcv`` (the paper's row names, paper.py)."""
    family, sep, method = source_name.rpartition("/")
    if method.startswith("attentive"):
        method = method.replace("attentive", "distilled", 1)
    else:
        method = f"distilled_{method}" if method else "distilled"
    return f"{family}{sep}{method}"


def distill_config(source_run: str | Path, config: str | Path | None = None,
                   overrides: Sequence[str] = ()) -> Config:
    """The distillation run's config (paper-spec A.8).

    Base: ``config`` if given, else the source run's resolved config.yaml (named like the
    paper's rows, attentive_* -> distilled_*); then ``overrides``; then always: dense routing
    with the softmax gate, no regularisers, gate and experts initialised from the source,
    experts frozen. The run folder is ``run_dir=`` from the overrides, else
    ``SOURCE_RUN_distilled`` (a config file's run_dir is not used: one file serves many sources).
    """
    source_run = Path(source_run)
    source_yaml = source_run / "config.yaml"
    if not source_yaml.exists():
        raise ConfigError(f"distill: {source_run} is not a run folder (no config.yaml)")
    reject_overrides(overrides, DISTILL_KEYS, "paper-spec A.8")
    source = load_config(source_yaml)
    cfg = load_config(config if config is not None else source_yaml, overrides)
    if config is None:
        cfg.name = distilled_name(source.name)
    if not any(o.split("=", 1)[0].strip() == "run_dir" for o in overrides):
        cfg.run_dir = f"{source_run}_distilled"
    for key in MATCHING_KEYS:
        section, leaf = key.split(".")
        ours, theirs = getattr(getattr(cfg, section), leaf), getattr(getattr(source, section), leaf)
        if ours != theirs:
            raise ConfigError(f"distill: {key}={ours!r} but the source run {source_run} has {theirs!r} "
                              f"(add {key}={theirs} to the overrides)")
    return with_values(cfg, {"moe.routing": "dense", "loss.importance_weight": 0.0, "loss.ls_beta": 0.0,
                             "loss.ls_gamma": 0.0, "train.init_from": str(source_run),
                             "train.init_parts": ["experts", "gate"], "train.freeze": ["experts"]})


def conditional_evaluation(trainer: Any, weights: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
    """Evaluate the distilled weights with top-k routing (noise off) on the whole test set.

    ``expert_flops_fraction`` = routed (sample, expert) pairs / (samples x E), counted from
    the top-k forward's ``samples_per_expert``: the share of the dense model's expert
    compute that conditional routing runs. A first untimed pass (which does the counting)
    warms up, so ``eval_seconds`` compares with the (warm) dense evaluation.
    """
    import torch
    import torch.distributed as dist

    from moe_dist.train.trainer import Trainer

    cfg = with_values(trainer.cfg, {"moe.routing": "topk", "moe.top_k": k, "moe.noise": "none",
                                    "train.init_from": ""})
    topk = Trainer(cfg, dataset=trainer.data)
    topk.load_model_state(weights)  # full layout: this rank's experts when they are sharded
    topk.model.eval()
    pairs_E = torch.zeros(topk.num_experts, dtype=torch.long)
    with torch.no_grad():
        for x, _, _ in topk.eval_batches.batches(0):  # with several ranks, this rank's share
            pairs_E += topk.model(x).samples_per_expert.cpu()
    if topk.ctx.distributed:
        dist.all_reduce(pairs_E)
    start = time.perf_counter()
    metrics = topk.evaluate()
    seconds = time.perf_counter() - start
    num_samples = len(topk.test_split)
    return {
        "test_error": metrics["error"],
        "expert_flops_fraction": int(pairs_E.sum()) / (num_samples * topk.num_experts),
        "routed_pairs_per_expert": pairs_E.tolist(),
        "mutual_information": metrics["mutual_information"],
        "usage_entropy": metrics["usage_entropy"],
        "eval_seconds": seconds,
    }


def distill(source_run: str | Path, config: str | Path | None = None, ks: Sequence[int] = (1, 2),
            overrides: Sequence[str] = ()) -> tuple[Config, dict[str, Any]]:
    """Train the distilled gate, evaluate it densely and with top-k routing for each k, check
    that the experts stayed frozen, and add ``conditional`` and ``experts_unchanged`` to the
    run's metrics.json. Returns the run's config and its updated metrics."""
    from moe_dist.parallel import process_group
    from moe_dist.train.trainer import Trainer, process_group_backend

    cfg = distill_config(source_run, config, overrides)
    for k in ks:
        if not 1 <= k <= cfg.moe.num_experts:
            raise ConfigError(f"distill: --k {k} must be between 1 and moe.num_experts={cfg.moe.num_experts}")
    with process_group(process_group_backend(cfg)):
        trainer = Trainer(cfg)
        metrics = trainer.fit()
        weights = latest_weights(cfg.run_dir)
        unchanged = tensors_identical(latest_weights(source_run), weights,
                                      part_parameter_names(trainer.module, "experts"))

        start = time.perf_counter()
        trainer.evaluate()  # warm: fit() has just evaluated this model
        dense_seconds = time.perf_counter() - start
        conditional: dict[str, Any] = {f"top{k}": conditional_evaluation(trainer, weights, k) for k in ks}
        conditional["dense_eval_seconds"] = dense_seconds
        metrics.update(conditional=conditional, experts_unchanged=unchanged)
        if trainer.is_main:
            (Path(cfg.run_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if not unchanged:
        raise MoEDistError(f"distill: the experts of {cfg.run_dir} differ from those of {source_run} "
                           "although train.freeze=[experts]")
    return cfg, metrics


def cmd_distill(args: argparse.Namespace) -> int:
    from moe_dist.cli import format_summary
    from moe_dist.parallel import is_main

    cfg, metrics = distill(args.source_run, args.config, args.k, args.overrides)
    if not is_main():
        return 0
    print(f"\n{cfg.name}: {cfg.run_dir} (experts unchanged: {metrics['experts_unchanged']})")
    print(format_summary(cfg.name, metrics))
    conditional = metrics["conditional"]
    print(f"\n{'routing':<8} {'test error':>10} {'expert FLOPs':>13} {'eval s':>8}")
    print(f"{'dense':<8} {metrics['test_error']:>10.4f} {1.0:>13.3f} {conditional['dense_eval_seconds']:>8.3f}")
    for k in args.k:
        row = conditional[f"top{k}"]
        print(f"{f'top-{k}':<8} {row['test_error']:>10.4f} {row['expert_flops_fraction']:>13.3f} "
              f"{row['eval_seconds']:>8.3f}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``moe-dist distill SOURCE_RUN [--config FILE] [--k 1,2] [overrides ...]``."""
    p = add_leaf_parser(
        subparsers, "distill", help="distil an attentive run into a softmax gate over its frozen experts (paper A.8)")
    p.add_argument("source_run", help="run folder of the attentive MoE to distil")
    p.add_argument("--config", default=None,
                   help="distillation config (e.g. configs/mnist/distilled_lcv.yaml); default: the source's")
    p.add_argument("--k", type=comma_ints, default=[1, 2],
                   help="evaluate the distilled gate with top-k routing for these k (default 1,2)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. run_dir=PATH")
    p.set_defaults(func=cmd_distill)
