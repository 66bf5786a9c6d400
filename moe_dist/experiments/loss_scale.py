"""``moe-dist study loss-scale``: how hard each regulariser pulls on the gate, next to the task loss.

The expert study finds L_s at the paper's Fashion-MNIST weights indistinguishable from no
regulariser, while L_cv at its chosen weight spreads the samples over every expert. A loss
term steers the routing in proportion to its gradient, so this measures the gradients: on a
run's training batches, the Frobenius norm of each weighted term's gradient with respect to
the gate probabilities ``P [B, E]`` (what every term acts on, whatever the gate; the part
along the simplex, each sample's gradient minus its mean over the experts) and to the
gate network's parameters, against the task loss's (mixture NLL) on the same batch:

* ``importance``: L_cv = w (std/mean of the experts' importance)^2 (docs/papers.md A.2.1);
* ``ls_same``: L_s's same-expert term, beta S (``reference`` variant; ``normalized``: beta S / B^2);
* ``ls_different``: L_s's different-expert term, -gamma T / B^2 (docs/papers.md A.2.2).

The weights are the run's own (``loss.importance_weight``, ``loss.ls_beta``, ``loss.ls_gamma``,
``loss.ls_variant``), or those of ``--weights``, so a vanilla run can be asked what the
paper's L_s would have done to it. ``--at init`` rebuilds the run's initial weights from its
config (no checkpoint needed: committed run folders have their ``config.yaml``); ``--at
latest`` loads its latest checkpoint (weights are not committed, so only where it trained).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moe_dist.config import Config, check_choice
from moe_dist.errors import ConfigError
from moe_dist.losses import (combine_similarity_terms, importance_loss, normalize_distances, sample_distances,
                             similarity_terms, task_loss)
from moe_dist.rundir import RunDir
from moe_dist.tables import markdown_table

TERMS = ("nll", "importance", "ls_same", "ls_different")
WEIGHT_KEYS = ("importance", "ls_beta", "ls_gamma", "ls_variant")


@dataclass(frozen=True)
class Weights:
    importance: float
    ls_beta: float
    ls_gamma: float
    ls_variant: str

    @classmethod
    def of(cls, cfg: Config, overrides: dict[str, str]) -> Weights:
        loss = cfg.loss
        w = cls(loss.importance_weight, loss.ls_beta, loss.ls_gamma, loss.ls_variant)
        w = replace(w, **{k: (v if k == "ls_variant" else float(v)) for k, v in overrides.items()})
        check_choice("loss.ls_variant", w.ls_variant)
        return w

    def of_term(self, term: str) -> float:
        return {"nll": 1.0, "importance": self.importance, "ls_same": self.ls_beta,
                "ls_different": self.ls_gamma}[term]


def parse_weights(text: str) -> dict[str, str]:
    """``importance=0.2,ls_beta=1e-7,ls_gamma=1e-2,ls_variant=reference`` -> a dict."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in WEIGHT_KEYS or not value:
            raise ConfigError(f"--weights {item!r}: expected key=value with key one of {', '.join(WEIGHT_KEYS)}")
        if key != "ls_variant":
            try:
                float(value)
            except ValueError:
                raise ConfigError(f"--weights {key}={value!r}: not a number") from None
        out[key] = value
    return out


def unit_terms(out, x: torch.Tensor, y_B: torch.Tensor, variant: str, loss_kind: str) -> dict[str, torch.Tensor]:
    """The four terms at unit weight on one batch (the model's forward ``out``)."""
    probs_BE = out.gate_probs
    B = probs_BE.shape[0]
    dist_BB = normalize_distances(sample_distances(x.flatten(1).to(probs_BE.dtype)))
    S, T = similarity_terms(dist_BB, probs_BE, probs_BE, symmetric=True)
    zero = torch.zeros_like(S)  # each L_s term alone, normalised as training combines them
    return {"nll": task_loss(out.output, out.output_kind, y_B, loss_kind),
            "importance": importance_loss(probs_BE, 1.0),
            "ls_same": combine_similarity_terms(S, zero, B, 1.0, 0.0, variant),
            "ls_different": combine_similarity_terms(zero, T, B, 0.0, 1.0, variant)}


def batch_gradient_norms(model: torch.nn.Module, x: torch.Tensor, y_B: torch.Tensor, weights: Weights,
                         loss_kind: str) -> dict[str, dict[str, float]]:
    """term -> {"probs": |d term/d P|, "gate": |d term/d gate parameters|} at unit weight."""
    out = model(x)
    gate = getattr(model, "gate", None)
    gate_params = [p for p in gate.parameters() if p.requires_grad] if gate is not None else []
    terms = unit_terms(out, x, y_B, weights.ls_variant, loss_kind)
    norms = {}
    for name, value in terms.items():
        grads = torch.autograd.grad(value, [out.gate_probs, *gate_params], retain_graph=True, allow_unused=True)
        flat = [g.flatten() for g in grads[1:] if g is not None]
        # only the part that moves P along the simplex counts: a gradient equal for every
        # expert of a sample changes nothing that the gate's softmax can express
        along_BE = grads[0] - grads[0].mean(1, keepdim=True) if grads[0] is not None else None
        norms[name] = {"probs": float(along_BE.norm()) if along_BE is not None else 0.0,
                       "gate": float(torch.cat(flat).norm()) if flat else 0.0}
    return norms


def _model_and_data(run: RunDir, at: str):
    """The run's config, its network (initial or latest weights, training mode) and data."""
    from moe_dist.parallel import ParallelContext
    from moe_dist.train.build import build_network, build_run_data, load_data
    from moe_dist.train.process import configure_process

    cfg = run.read_config()
    if cfg.model.kind != "moe":
        raise ConfigError(f"{run}: model.kind={cfg.model.kind!r}; loss-scale needs an MoE run")
    configure_process(cfg)
    ctx = ParallelContext.local()
    data = build_run_data(cfg, load_data(cfg), ctx, torch.device("cpu"))
    model = build_network(cfg, data.dataset, ctx, init=at == "init")
    if at == "latest":
        model.load_state_dict(run.latest_weights())
    return cfg, model.train(), data


def run_gradient_scale(run: RunDir, at: str, num_batches: int, weight_overrides: dict[str, str]) -> dict[str, Any]:
    """The mean over ``num_batches`` training batches (epoch 0's order) of each term's
    gradient norms, unit and weighted, and the weighted ones over the NLL's."""
    if num_batches < 1:
        raise ConfigError(f"--batches {num_batches}: at least 1")
    cfg, model, data = _model_and_data(run, at)
    weights = Weights.of(cfg, weight_overrides)
    sums = {t: {"probs": 0.0, "gate": 0.0} for t in TERMS}
    batches = data.train_batches.batches(0)
    for _ in range(num_batches):
        x, y_B = next(batches)[:2]
        for term, norms in batch_gradient_norms(model, x, y_B, weights, cfg.loss.kind).items():
            for where, value in norms.items():
                sums[term][where] += value / num_batches
    weighted = {t: {w: v * weights.of_term(t) for w, v in n.items()} for t, n in sums.items()}
    nll = weighted["nll"]
    return {"run": str(run), "num_experts": cfg.moe.num_experts, "routing": cfg.moe.routing, "at": at,
            "batches": num_batches, "batch_size": cfg.train.batch_size, "weights": weights.__dict__,
            "unit": sums, "weighted": weighted,
            "ratio_to_nll": {t: {w: v / nll[w] if nll[w] else float("nan") for w, v in n.items()}
                             for t, n in weighted.items() if t != "nll"}}


def table(results: list[dict[str, Any]]) -> str:
    header = ["run", "E", "at", "|dNLL/dP|", "L_cv / NLL (P)", "L_s same / NLL (P)", "L_s diff / NLL (P)",
              "L_cv / NLL (gate)", "L_s same / NLL (gate)", "L_s diff / NLL (gate)"]
    rows = []
    for r in results:
        ratio = r["ratio_to_nll"]
        rows.append([r["run"], r["num_experts"], r["at"], f"{r['weighted']['nll']['probs']:.3g}",
                     *(f"{ratio[t][w]:.3g}" for w in ("probs", "gate") for t in ("importance", "ls_same", "ls_different"))])
    return markdown_table(header, rows)


def cmd_loss_scale(args: argparse.Namespace) -> int:
    overrides = parse_weights(args.weights)
    results = [run_gradient_scale(RunDir(path), args.at, args.batches, overrides) for path in args.runs]
    text = table(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("loss-scale", help="gradient of each regulariser on the gate against the task loss's",
                       description="How hard each regulariser (L_cv, L_s's two terms, at the run's weights or\n"
                                   "--weights) pulls on the routing: the norm of its gradient on the gate probabilities\n"
                                   "and the gate's parameters over that of the task loss, on the run's training batches,\n"
                                   "at its initial or its latest weights. Details: README, \"Studies\".",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  moe-dist study loss-scale docs/results/study_fmnist/ls_e20/seed0 "
                              "--weights importance=0.2 --out ls_scale")
    p.add_argument("runs", nargs="+", help="run folders (their config.yaml; --at latest: their checkpoints)")
    p.add_argument("--at", choices=("init", "latest"), default="init",
                   help="the run's initial weights (from its config and seed) or its latest checkpoint")
    p.add_argument("--batches", type=int, default=8, help="training batches to average over (default 8)")
    p.add_argument("--weights", default="", metavar="K=V,...",
                   help=f"replace the run's loss weights: any of {', '.join(WEIGHT_KEYS)}")
    p.add_argument("--out", help="also write OUT.md (the table) and OUT.json")
    p.set_defaults(func=cmd_loss_scale)
