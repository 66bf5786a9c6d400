"""Section 4.2: pretrained gate / pretrained experts (docs/papers.md A.6, Table 1).

The experiment asks whether end-to-end training finds a good decomposition of the task.

* "scratch" (the decomposition end-to-end training finds): train a MoE end-to-end
  (``scratch``); then freeze its gate and train new experts under it, either from the
  scratch experts' initial weights (``scratch_same_wts``) or from fresh random weights
  (``scratch_rand_wts``). If the gate had found a good decomposition, new experts would
  do as well as the old ones.
* "prechosen" (an intuitive decomposition): pretrain one expert per class pair of a split
  on that pair only (full softmax kept), freeze them and train a fresh gate on them
  (``pretrained_gate``); then freeze that gate and train new experts under it, from the
  pretrained experts' initial weights (``prechosen_same_wts``) or fresh ones
  (``prechosen_rand_wts``).

Every stage is an ordinary run folder (config.yaml, metrics.json, checkpoints/), so
``moe-dist eval`` and the reports read them. Layout under ``ROOT/DATASET``::

    seed{s}/{scratch,scratch_same_wts,scratch_rand_wts}/
    split{k}_seed{s}/expert{i}_{a}_{b}/            pretrained single experts
    split{k}_seed{s}/assembled/pretrained_experts/  the E trained singles stacked (checkpoint only)
    split{k}_seed{s}/assembled/prechosen_init/      the singles' initial weights + the pretrained gate
    split{k}_seed{s}/{pretrained_gate,prechosen_same_wts,prechosen_rand_wts}/
    summary.md, summary.csv                         means per stage next to the paper's Table 1

How the "same weights" are obtained: the trainer seeds and then builds the experts before
the gate (models/build.py), so a run with the scratch run's seed and architecture starts
from the scratch run's initial experts; the procedure rebuilds the scratch model to check
this before training. The pretrained experts were separate single models, so their initial
weights are stacked into an assembled checkpoint instead. Frozen parts are checked to be
bit-identical to their source after every stage.

Under a launcher (``torchrun --nproc_per_node N -m moe_dist.cli study pretrained-gate ...
parallel.ep_size=N``) every rank runs the whole flow with one process group held throughout;
rank 0 writes the assembled checkpoints and the summary, the others wait for them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_dist.config import CONFIGS, Config, load_config, with_values
from moe_dist.data import Dataset
from moe_dist.errors import ConfigError, MoEDistError
from moe_dist.experiments.arguments import reject_overrides
from moe_dist.models.parts import cpu_copy, part_state, tensors_identical
from moe_dist.fields import section4_fields
from moe_dist.paper import PRETRAINED_GATE
from moe_dist.parallel import barrier, is_main, process_group
from moe_dist.tables import markdown_table
from moe_dist.rundir import RunDir
from moe_dist.train.build import load_data

CONFIG_DIR = CONFIGS / "section4"
#: --dataset -> prefix of its configs/section4/*.yaml files and of its run names.
DATASETS = {"mnist10k": "mnist", "fmnist_mnist": "fmnist_mnist"}
#: The paper's class-pair splits (docs/papers.md A.6). The combined dataset's first three pairs
#: are Fashion-MNIST classes 0-5, the last three MNIST digits 4-9 under their combined labels 6-11.
SPLITS: dict[str, list[list[list[int]]]] = {
    "mnist10k": [
        [[0, 7], [1, 9], [2, 4], [3, 8], [5, 6]],
        [[4, 6], [1, 7], [2, 9], [3, 8], [0, 5]],
        [[4, 7], [0, 6], [3, 8], [1, 2], [5, 9]],
        [[5, 8], [6, 9], [1, 3], [0, 2], [4, 7]],
        [[2, 8], [3, 6], [0, 5], [4, 7], [1, 9]],
    ],
    "fmnist_mnist": [
        [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]],
        [[0, 3], [1, 4], [2, 5], [6, 9], [7, 11], [8, 10]],
        [[0, 5], [1, 2], [3, 4], [6, 8], [7, 10], [9, 11]],
    ],
}
STAGES = ("scratch", "scratch_same_wts", "scratch_rand_wts",
          "pretrained_gate", "prechosen_same_wts", "prechosen_rand_wts")
STAGE_LABELS = {
    "scratch": "scratch (end-to-end)",
    "scratch_same_wts": "scratch gate + same-init experts",
    "scratch_rand_wts": "scratch gate + new random experts",
    "pretrained_gate": "gate trained on pretrained experts",
    "prechosen_same_wts": "prechosen gate + same-init experts",
    "prechosen_rand_wts": "prechosen gate + new random experts",
}
#: Seed offset of the "new random experts" stages: a different seed draws different experts.
RAND_WTS_SEED_OFFSET = 1000
#: The MNIST notebook trains scratch_rand_wts with RMSprop (lr 1e-3 as every stage, momentum
#: 0.9), every other stage with Adam: an optimizer confound the paper does not mention (A.6, [FLAG]).
SCRATCH_RAND_OPTIMIZER: dict[str, dict[str, Any]] = {
    "mnist10k": {"train.optimizer": "rmsprop", "train.momentum": 0.9},
    "fmnist_mnist": {},
}
#: Keys the procedure sets per stage; overriding them would be silently ignored.
OWNED_KEYS = ("name", "run_dir", "seed", "model.kind", "train.init_from", "train.init_parts", "train.freeze")
#: Summary columns: metrics.json key (the registry's Section 4.2 fields, in the order of
#: paper.PRETRAINED_GATE's tuples), heading (docs/papers.md A.6 reporting).
COLUMNS = tuple(zip(section4_fields(), ("test err", "train loss", "I(E;Y)", "H_s", "H_u"), strict=True))
DATA_NOTES = {
    "mnist10k": "MNIST here is the mnist10k split (8,000 train / 2,000 test images of the real MNIST "
                "test set), not the paper's first 10,000 / 2,000 of MNIST train / test.",
    "fmnist_mnist": "The combined dataset is built from Fashion-MNIST and, without full MNIST, from the "
                    "mnist10k split, so its MNIST training half has fewer than the paper's 5,000 images.",
}


def _train(cfg: Config, data: Dataset, starts_from: Mapping[str, torch.Tensor] | None = None,
           what: str = "") -> None:
    """Train ``cfg`` unless its run is finished. ``starts_from`` (name -> tensor) is checked
    against the freshly built model first: the stage must start from exactly those weights."""
    from moe_dist.train.build import build_trainer

    if RunDir(cfg.run_dir).finished(cfg):
        return
    trainer = build_trainer(cfg, dataset=data)
    if starts_from is not None and not tensors_identical(starts_from, cpu_copy(trainer.engine.model_state()),
                                                         starts_from):
        raise MoEDistError(f"{cfg.run_dir} does not start from {what}")
    trainer.fit()


def _check_frozen(cfg: Config, part: str, source: Mapping[str, torch.Tensor], source_name: str) -> None:
    """A frozen part must end bit-identical to where it came from (these architectures have
    no BatchNorm, docs/papers.md A.1.1-A.1.2, so every tensor of the part is compared)."""
    reference = part_state(source, part)
    if not tensors_identical(reference, RunDir(cfg.run_dir).latest_weights(), reference):
        raise MoEDistError(f"{cfg.run_dir}: the frozen {part} differs from {source_name}")


def _initial_weights(cfg: Config, data: Dataset) -> dict[str, torch.Tensor]:
    """The weights a run of ``cfg`` starts from (every expert): built as the trainer builds it."""
    from moe_dist.parallel import ParallelContext
    from moe_dist.train.build import build_network

    return cpu_copy(build_network(cfg, data, ParallelContext.local()).state_dict())


def single_expert_config(base: Config, pair: Sequence[int], seed: int, name: str, run_dir: Path) -> Config:
    """The pretraining step's run: one expert alone (``model.kind: single``) on one class pair."""
    return with_values(base, {"name": name, "run_dir": str(run_dir), "seed": seed, "model.kind": "single",
                              "data.classes": list(pair)})


def _all_finished(*cfgs: Config) -> bool:
    return all(RunDir(cfg.run_dir).finished(cfg) for cfg in cfgs)


def _write_assembled(folder: Path, state: dict[str, torch.Tensor], sources: dict[str, Any]) -> Path:
    """A checkpoint-only folder that ``train.init_from`` reads; assembled.json says what it
    holds. Rank 0 writes it; every rank returns once it is there."""
    if is_main():
        RunDir(folder).save_checkpoint({"model": state}, 0, keep=1)
        (folder / "assembled.json").write_text(json.dumps(sources, indent=1))
    barrier()
    return folder


def _stack_singles(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Single models' ``expert.<k>`` stacked into a MoE's ``experts.<k>`` [E, ...] (the
    ExpertBank layout: dim 0 is the expert, names are the single expert's, models/experts.py)."""
    keys = [k for k in states[0] if k.startswith("expert.")]
    return {"experts." + k[len("expert."):]: torch.stack([s[k] for s in states]) for k in keys}


class PretrainedGateStudy:
    """The A.6 flow for one dataset: configs, data and the run folders of every stage."""

    def __init__(self, dataset: str, root: str | Path, overrides: Sequence[str] = ()):
        if dataset not in DATASETS:
            raise ConfigError(f"--dataset {dataset!r} is not one of: {', '.join(DATASETS)}")
        reject_overrides(overrides, OWNED_KEYS, "use --root and --seeds")
        self.dataset = dataset
        self.prefix = DATASETS[dataset]
        self.root = Path(root) / dataset
        self.scratch_cfg = load_config(CONFIG_DIR / f"{self.prefix}_scratch.yaml", overrides)
        self.prechosen_cfg = load_config(CONFIG_DIR / f"{self.prefix}_pretrained_gate.yaml", overrides)
        if self.scratch_cfg.data != self.prechosen_cfg.data:
            raise ConfigError(f"configs/section4/{self.prefix}_*.yaml must use the same data settings")
        self.data = load_data(self.scratch_cfg)

    def _stage(self, base: Config, folder: Path, stage: str, seed: int,
               values: dict[str, Any] | None = None) -> Config:
        return with_values(base, {"name": f"section4/{self.prefix}_{stage}", "run_dir": str(folder / stage),
                                  "seed": seed, **(values or {})})

    def scratch(self, seed: int) -> dict[str, Path]:
        """Stage (1): end-to-end MoE, then its frozen gate with same-init / new experts."""
        folder = self.root / f"seed{seed}"
        scratch = self._stage(self.scratch_cfg, folder, "scratch", seed)
        gate_from_scratch = {"train.init_from": scratch.run_dir, "train.init_parts": ["gate"],
                             "train.freeze": ["gate"]}
        same = self._stage(self.scratch_cfg, folder, "scratch_same_wts", seed, gate_from_scratch)
        rand = self._stage(self.scratch_cfg, folder, "scratch_rand_wts", seed + RAND_WTS_SEED_OFFSET,
                           {**gate_from_scratch, **SCRATCH_RAND_OPTIMIZER[self.dataset]})
        paths = {"scratch": Path(scratch.run_dir), "scratch_same_wts": Path(same.run_dir),
                 "scratch_rand_wts": Path(rand.run_dir)}
        if _all_finished(scratch, same, rand):  # committed results carry no weights: read none
            return paths
        _train(scratch, self.data)
        trained = RunDir(scratch.run_dir).latest_weights()
        if not RunDir(same.run_dir).finished(same):
            initial_experts = part_state(_initial_weights(scratch, self.data), "experts")
            _train(same, self.data, {**initial_experts, **part_state(trained, "gate")},
                   f"the scratch run's initial experts and trained gate ({scratch.run_dir})")
        _train(rand, self.data, part_state(trained, "gate"), f"the scratch gate ({scratch.run_dir})")
        for cfg in (same, rand):
            _check_frozen(cfg, "gate", trained, scratch.run_dir)
        return paths

    def prechosen(self, split: int, pairs: Sequence[Sequence[int]], seed: int) -> dict[str, Path]:
        """Stage (2): experts pretrained on class pairs, a gate on them, then new experts."""
        from moe_dist.train.build import build_trainer

        E = self.prechosen_cfg.moe.num_experts
        if len(pairs) != E:
            raise ConfigError(f"split {split} has {len(pairs)} class pairs but moe.num_experts={E}")
        for pair in pairs:
            for name, part in (("training", self.data.train), ("test", self.data.test)):
                if len(part.select_classes(list(pair))) == 0:
                    raise ConfigError(f"class pair {list(pair)} has no {name} samples in {self.dataset} "
                                      "(data.train_size / data.test_size keep only the first samples)")
        folder = self.root / f"split{split}_seed{seed}"
        gate, same, rand = self._prechosen_stages(folder, seed)
        paths = {"pretrained_gate": Path(gate.run_dir), "prechosen_same_wts": Path(same.run_dir),
                 "prechosen_rand_wts": Path(rand.run_dir)}
        if _all_finished(gate, same, rand):  # committed results carry no weights: read none
            return paths
        initial, trained, single_dirs = [], [], []
        for i, pair in enumerate(pairs):
            # One seed per expert (seed * E + i): E singles built under one seed would be identical.
            single = single_expert_config(self.prechosen_cfg, pair, seed * E + i,
                                          f"section4/{self.prefix}_pretrained_expert",
                                          folder / f"expert{i}_{'_'.join(map(str, pair))}")
            initial.append(_initial_weights(single, self.data))
            if not RunDir(single.run_dir).finished(single):
                build_trainer(single, dataset=self.data).fit()
            trained.append(RunDir(single.run_dir).latest_weights())
            single_dirs.append(single.run_dir)
        sources = {"pairs": [list(p) for p in pairs], "singles": single_dirs}
        experts = _write_assembled(folder / "assembled" / "pretrained_experts", _stack_singles(trained),
                                   {**sources, "holds": "experts.* = the trained single experts, stacked"})
        pretrained = RunDir(experts).latest_weights()
        _train(gate, self.data, pretrained, f"the pretrained experts ({experts})")
        _check_frozen(gate, "experts", pretrained, str(experts))

        gate_state = part_state(RunDir(gate.run_dir).latest_weights(), "gate")
        init_state = {**_stack_singles(initial), **gate_state}
        init = _write_assembled(folder / "assembled" / "prechosen_init", init_state,
                                {**sources, "gate": gate.run_dir,
                                 "holds": "experts.* = the single experts' initial weights; "
                                          "gate.* = the pretrained gate"})
        _train(same, self.data, init_state, f"the pretrained experts' initial weights and gate ({init})")
        _train(rand, self.data, gate_state, f"the pretrained gate ({gate.run_dir})")
        for cfg in (same, rand):
            _check_frozen(cfg, "gate", gate_state, gate.run_dir)
        return paths

    def _prechosen_stages(self, folder: Path, seed: int) -> tuple[Config, Config, Config]:
        """The configs of stage (2)'s gate, same-init and new-expert runs: their init_from
        paths are the fixed folders ``prechosen`` assembles into."""
        assembled = folder / "assembled"
        gate = self._stage(self.prechosen_cfg, folder, "pretrained_gate", seed, {
            "train.init_from": str(assembled / "pretrained_experts"), "train.init_parts": ["experts"],
            "train.freeze": ["experts"]})
        same = self._stage(self.prechosen_cfg, folder, "prechosen_same_wts", seed, {
            "train.init_from": str(assembled / "prechosen_init"), "train.init_parts": ["experts", "gate"],
            "train.freeze": ["gate"]})
        rand = self._stage(self.prechosen_cfg, folder, "prechosen_rand_wts", seed + RAND_WTS_SEED_OFFSET, {
            "train.init_from": gate.run_dir, "train.init_parts": ["gate"], "train.freeze": ["gate"]})
        return gate, same, rand

    def summarize(self, runs: Mapping[str, Sequence[Path]]) -> list[dict[str, Any]]:
        """Mean of each A.6 column per stage, next to the paper's; writes summary.md/.csv."""
        rows = []
        for stage in STAGES:
            metrics = [RunDir(r).read_metrics() for r in runs.get(stage, [])]
            row: dict[str, Any] = {"stage": stage, "runs": len(metrics)}
            for (key, _), paper in zip(COLUMNS, PRETRAINED_GATE[self.dataset][stage]):
                values = [m[key] for m in metrics if m.get(key) is not None]
                row[key] = sum(values) / len(values) if values else None
                row[f"paper_{key}"] = paper
            rows.append(row)
        if is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / "summary.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            (self.root / "summary.md").write_text(self._markdown(rows))
        return rows

    def _markdown(self, rows: list[dict[str, Any]]) -> str:
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        head = ["stage", "runs"] + [h for _, name in COLUMNS for h in (name, "paper")]
        lines = [
            f"# Section 4.2 pretrained gate / experts: {self.dataset}",
            "",
            "Means over the runs of each stage (scratch stages: seeds; prechosen stages: splits x seeds), "
            "paper values from its results/*_final_pretrained_results.csv (docs/papers.md A.6). Test error on the "
            "whole test set; train loss = mean batch loss of the last epoch; I(E;Y) with true labels "
            "(the paper's code counts the chosen expert's predicted class); H_s, H_u in bits.",
            "",
            DATA_NOTES[self.dataset],
            "",
        ]
        cells = [[STAGE_LABELS[row["stage"]], str(row["runs"]),
                  *(c for key, _ in COLUMNS for c in (fmt(row[key]), fmt(row[f"paper_{key}"])))] for row in rows]
        lines.append(markdown_table(head, cells))
        return "\n".join(lines) + "\n"


def run_pretrained_gate_study(dataset: str, splits: Mapping[int, Sequence[Sequence[int]]],
                              seeds: Sequence[int], root: str | Path = "runs/section4",
                              overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every stage of docs/papers.md A.6 for each seed (scratch) and split x seed (prechosen),
    skipping complete runs; returns the summary rows (also written under ``root/dataset``).
    ``splits`` maps a split number (its folder name) to its class pairs, one per expert.
    ``overrides`` apply to every stage; a pretrained expert's ``data.classes`` is its pair."""
    from moe_dist.train.process import process_group_backend

    study = PretrainedGateStudy(dataset, root, overrides)
    runs: dict[str, list[Path]] = {stage: [] for stage in STAGES}
    with process_group(process_group_backend(study.scratch_cfg), study.scratch_cfg.parallel.timeout_s):
        for seed in seeds:
            for stage, run in study.scratch(seed).items():
                runs[stage].append(run)
            for split, pairs in splits.items():
                for stage, run in study.prechosen(split, pairs, seed).items():
                    runs[stage].append(run)
    return study.summarize(runs)
