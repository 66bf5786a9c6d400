"""``moe-dist distill``: a softmax gate distilled from an attentive MoE (docs/papers.md A.8, section 5.1).

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
rank 0 writes; the results equal a single process's (tested on the MNIST family; BatchNorm
statistics are the global batch's, ``moe_dist.parallel.batchnorm``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_dist.config import Config, load_config, with_values
from moe_dist.errors import ConfigError, MoEDistError
from moe_dist.experiments.arguments import add_leaf_parser, comma_ints, reject_overrides
from moe_dist.rundir import RunDir

if TYPE_CHECKING:  # torch is imported where it is used, so building the CLI parser stays fast
    import torch

    from moe_dist.train.trainer import Trainer

#: Keys the distillation sets itself (A.8); an override of one of them would be ignored.
DISTILL_KEYS = ("moe.routing", "loss.importance_weight", "loss.ls_beta", "loss.ls_gamma",
                "train.init_from", "train.init_parts", "train.freeze")
#: Source and distilled model must agree on these, or the copied weights mean nothing.
MATCHING_KEYS = ("data.name", "data.classes", "model.arch", "model.kind", "moe.num_experts")


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
    """The distillation run's config (docs/papers.md A.8).

    Base: ``config`` if given, else the source run's resolved config.yaml (named like the
    paper's rows, attentive_* -> distilled_*); then ``overrides``; then always: dense routing
    with the softmax gate, no regularisers, gate and experts initialised from the source,
    experts frozen. The run folder is ``run_dir=`` from the overrides, else
    ``SOURCE_RUN_distilled`` (a config file's run_dir is not used: one file serves many sources).
    """
    source_run = RunDir(source_run)
    if not source_run.is_run():
        raise ConfigError(f"distill: {source_run} is not a run folder (no config.yaml)")
    reject_overrides(overrides, DISTILL_KEYS, "docs/papers.md A.8")
    source = source_run.read_config()
    cfg = load_config(config if config is not None else source_run.config_path, overrides)
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


def conditional_evaluation(trainer: Trainer, weights: dict[str, torch.Tensor], k: int) -> dict[str, Any]:
    """Evaluate the distilled weights with top-k routing (noise off) on the whole test set.

    ``expert_flops_fraction`` = routed (sample, expert) pairs / (samples x E), counted from
    the top-k forward's ``samples_per_expert``: the share of the dense model's expert
    compute that conditional routing runs. A first untimed pass (which does the counting)
    warms up, so ``eval_seconds`` compares with the (warm) dense evaluation.
    """
    import torch

    from moe_dist.parallel import all_reduce, load_full_model_state
    from moe_dist.train.build import build_network
    from moe_dist.train.evaluate import evaluate

    cfg = with_values(trainer.cfg, {"moe.routing": "topk", "moe.top_k": k, "moe.noise": "none",
                                    "train.init_from": ""})
    model = build_network(cfg, trainer.data.dataset, trainer.ctx).to(trainer.device)
    load_full_model_state(model, weights, trainer.ctx)  # full layout: this rank's experts when sharded
    model.eval()
    batches, E = trainer.data.eval_batches, cfg.moe.num_experts
    pairs_E = torch.zeros(E, dtype=torch.long)
    with torch.no_grad():
        for x, _, _ in batches.batches(0):  # with several ranks, this rank's share
            pairs_E += model(x).samples_per_expert.cpu()
    all_reduce(pairs_E)
    start = time.perf_counter()
    metrics = evaluate(model, batches, trainer.data.dataset.num_classes, num_experts=E,
                       loss_kind=cfg.loss.kind, autocast=trainer.engine.autocast)
    seconds = time.perf_counter() - start
    return {
        "test_error": metrics["error"],
        "expert_flops_fraction": int(pairs_E.sum()) / (len(trainer.data.test) * E),
        "routed_pairs_per_expert": pairs_E.tolist(),
        "mutual_information": metrics["mutual_information"],
        "usage_entropy": metrics["usage_entropy"],
        "eval_seconds": seconds,
    }


def distillation_metrics(source_run: RunDir, ks: Sequence[int]):
    """What distillation adds to the run's metrics.json (``Trainer.fit(extra_metrics=...)``,
    so that the file is written once, complete): whether the frozen experts ended
    bit-identical to the source's, and the top-k evaluations."""

    def extra(trainer: Trainer, result: dict[str, Any]) -> dict[str, Any]:
        from moe_dist.models.parts import cpu_copy, part_parameter_names, tensors_identical

        weights = cpu_copy(trainer.engine.model_state())  # what the last checkpoint holds
        unchanged = tensors_identical(source_run.latest_weights(), weights,
                                      part_parameter_names(trainer.model, "experts"))
        start = time.perf_counter()
        trainer.evaluate()  # warm: fit() has just evaluated this model
        conditional: dict[str, Any] = {f"top{k}": conditional_evaluation(trainer, weights, k) for k in ks}
        conditional["dense_eval_seconds"] = time.perf_counter() - start
        return {"conditional": conditional, "experts_unchanged": unchanged}

    return extra


def distill(source_run: str | Path, config: str | Path | None = None, ks: Sequence[int] = (1, 2),
            overrides: Sequence[str] = ()) -> tuple[Config, dict[str, Any]]:
    """Train the distilled gate, evaluate it densely and with top-k routing for each k, check
    that the experts stayed frozen; the run's metrics.json holds ``conditional`` and
    ``experts_unchanged``. Returns the run's config and its metrics."""
    from moe_dist.parallel import process_group
    from moe_dist.train.build import build_trainer
    from moe_dist.train.process import process_group_backend

    cfg = distill_config(source_run, config, overrides)
    for k in ks:
        if not 1 <= k <= cfg.moe.num_experts:
            raise ConfigError(f"distill: --k {k} must be between 1 and moe.num_experts={cfg.moe.num_experts}")
    with process_group(process_group_backend(cfg), cfg.parallel.timeout_s):
        metrics = build_trainer(cfg).fit(extra_metrics=distillation_metrics(RunDir(source_run), ks))
    if not metrics["experts_unchanged"]:
        raise MoEDistError(f"distill: the experts of {cfg.run_dir} differ from those of {source_run} "
                           "although train.freeze=[experts]")
    return cfg, metrics


def cmd_distill(args: argparse.Namespace) -> int:
    from moe_dist.parallel import is_main

    # the positionals: source runs, then key=value overrides (argparse cannot tell them apart)
    sources = [a for a in args.source_run if "=" not in a]
    overrides = [a for a in args.source_run if "=" in a] + list(args.overrides)
    if not sources:
        raise ConfigError("distill: name at least one source run")
    if len(sources) > 1:
        return _distill_stacked(sources, args.config, args.k, overrides)
    cfg, metrics = distill(sources[0], args.config, args.k, overrides)
    if not is_main():
        return 0
    _print_distilled(cfg, metrics, args.k)
    return 0


def _distill_stacked(sources: list[str], config: str | None, ks: Sequence[int], overrides: list[str]) -> int:
    """Several sources: their distillations trained as stacks (moe_dist.experiments.stacks)."""
    from moe_dist.experiments.stacks import StackEntry, train_entries

    entries = [StackEntry(config or "", tuple(overrides), source, tuple(ks)) for source in sources]
    for entry, metrics in zip(entries, train_entries(entries)):
        _print_distilled(entry.resolve(), metrics, ks)
    return 0


def _print_distilled(cfg: Config, metrics: dict[str, Any], ks: Sequence[int]) -> None:
    from moe_dist.paper import format_summary

    print(f"\n{cfg.name}: {cfg.run_dir} (experts unchanged: {metrics['experts_unchanged']})")
    print(format_summary(cfg, metrics))
    conditional = metrics["conditional"]
    print(f"\n{'routing':<8} {'test error':>10} {'expert FLOPs':>13} {'eval s':>8}")
    print(f"{'dense':<8} {metrics['test_error']:>10.4f} {1.0:>13.3f} {conditional['dense_eval_seconds']:>8.3f}")
    for k in ks:
        row = conditional[f"top{k}"]
        print(f"{f'top-{k}':<8} {row['test_error']:>10.4f} {row['expert_flops_fraction']:>13.3f} "
              f"{row['eval_seconds']:>8.3f}")


def register(subparsers: Any) -> None:
    """Add ``moe-dist distill SOURCE_RUN [SOURCE_RUN ...] [--config FILE] [--k 1,2] [overrides ...]``."""
    p = add_leaf_parser(
        subparsers, "distill", help="distil an attentive run into a softmax gate over its frozen experts (paper A.8)",
        description="Freeze the experts of a finished attentive MoE run, train a softmax gate initialised from\n"
                    "its attentive gate, then evaluate it with top-k routing, where only k experts run per\n"
                    "sample (paper section 5.1). Details: README, \"Distillation\".",
        epilog="example (train a source, then distil it):\n"
               "  moe-dist train --config configs/mnist/attentive_lcv.yaml run_dir=runs/attentive_lcv\n"
               "  moe-dist distill runs/attentive_lcv --config configs/mnist/distilled_lcv.yaml --k 1,2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source_run", nargs="+", metavar="SOURCE_RUN",
                   help="run folder(s) of the attentive MoE(s) to distil; several: their distillations "
                        "are trained as one stack (each in SOURCE_RUN_distilled)")
    p.add_argument("--config", default=None,
                   help="distillation config (e.g. configs/mnist/distilled_lcv.yaml); default: the source's")
    p.add_argument("--k", type=comma_ints, default=[1, 2],
                   help="evaluate the distilled gate with top-k routing for these k (default 1,2)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. run_dir=PATH")
    p.set_defaults(func=cmd_distill)
