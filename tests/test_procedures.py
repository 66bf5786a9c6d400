"""The papers' procedures: distillation (docs/papers.md A.8), the Section 4 pretrained-gate study
(A.6) and the expert-count study (A.10), each on a toy version of its task (seconds)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS
from moe_dist.cli import main
from moe_dist.config import from_dict, load_config, save_config
from moe_dist.errors import ConfigError
from moe_dist.experiments.distill import distill_config
from moe_dist.experiments.dead_experts import wilson
from moe_dist.experiments.pretrained import STAGES, run_pretrained_gate_study
from moe_dist.experiments.study import REGULARIZERS, experts_run_dir
from moe_dist.experiments.study_figures import FIGURE_NAMES
from moe_dist.train.checkpoint import load_checkpoint
from moe_dist.train.build import build_trainer

# One thread: the test machine's cores are shared, and intra-op threads then only contend.
FAST = ["train.progress=false", "train.num_threads=1", "train.eval_every=100"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(run_dir) / "checkpoints")["model"]


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------ distillation

def test_distill_freezes_experts_keeps_accuracy_and_routes_top1_at_one_expert(tmp_path, data_root, capsys):
    """An attentive MoE on three well separated digits, distilled into a softmax gate."""
    data = [f"data.root={data_root}", "data.name=mnist10k", "data.train_size=2000", "data.test_size=1000",
            "data.classes=[0,1,7]", "train.epochs=3", "train.batch_size=32", "train.lr=3e-3", *FAST]
    source, distilled = tmp_path / "attentive_lcv", tmp_path / "distilled"
    source_metrics = build_trainer(load_config(CONFIGS / "mnist" / "attentive_lcv.yaml",
                                         [*data, f"run_dir={source}"])).fit()
    assert main(["distill", str(source), "--config", str(CONFIGS / "mnist" / "distilled_lcv.yaml"),
                 "--k", "1,2", *data, f"run_dir={distilled}"]) == 0
    assert "top-1" in capsys.readouterr().out

    metrics = json.loads((distilled / "metrics.json").read_text())
    assert metrics["experts_unchanged"] is True
    before, after = weights(source), weights(distilled)
    assert_identical(part(before, "experts."), part(after, "experts."))
    assert not part(after, "attention."), "W_q and W_k are dropped"
    assert "gate.out.weight" in after and "gate.out.weight" not in before, "the softmax output layer is new"
    assert metrics["test_error"] <= source_metrics["test_error"] + 0.05
    assert metrics["test_error"] < 0.1

    E = 5
    conditional = metrics["conditional"]
    assert conditional["top1"]["expert_flops_fraction"] == pytest.approx(1 / E, abs=1e-12)
    assert conditional["top2"]["expert_flops_fraction"] == pytest.approx(2 / E, abs=1e-12)
    for k in ("top1", "top2"):
        assert {"test_error", "mutual_information", "usage_entropy", "eval_seconds"} <= conditional[k].keys()
    assert conditional["top1"]["test_error"] <= metrics["test_error"] + 0.05
    assert conditional["dense_eval_seconds"] > 0
    saved = load_config(distilled / "config.yaml")
    assert saved.name == "mnist/distilled_lcv" and saved.moe.routing == "dense"
    assert saved.loss.importance_weight == 0 and saved.train.freeze == ["experts"]


def test_distill_config_derives_from_the_source_and_forces_the_a8_settings(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    save_config(load_config(CONFIGS / "mnist" / "attentive_ls.yaml", [f"run_dir={source}"]), source / "config.yaml")

    cfg = distill_config(source)
    assert (cfg.name, cfg.run_dir) == ("mnist/distilled_ls", f"{source}_distilled")
    assert (cfg.moe.routing, cfg.loss.ls_beta, cfg.loss.ls_gamma, cfg.loss.importance_weight) == ("dense", 0, 0, 0)
    assert cfg.train.init_from == str(source)
    assert (cfg.train.init_parts, cfg.train.freeze) == (["experts", "gate"], ["experts"])
    assert distill_config(source, overrides=["run_dir=elsewhere"]).run_dir == "elsewhere"
    assert distill_config(source, CONFIGS / "mnist" / "distilled_ls.yaml").name == "mnist/distilled_ls"

    with pytest.raises(ConfigError, match="moe.routing is set by this procedure"):
        distill_config(source, overrides=["moe.routing=attentive"])
    with pytest.raises(ConfigError, match=r"data.name='mnist10k' but the source run .* has 'mnist'"):
        distill_config(source, CONFIGS / "mnist" / "distilled_ls.yaml", ["data.name=mnist10k"])


# ------------------------------------------------------------------------ Section 4 (A.6)

def test_pretrained_gate_study_routes_each_pair_to_its_expert_and_keeps_frozen_parts(tmp_path, data_root):
    """Two class pairs, two experts: the prechosen decomposition on a four-digit toy task."""
    pairs = [[0, 1], [2, 3]]
    overrides = [f"data.root={data_root}", "data.train_size=1200", "data.test_size=500", "data.classes=[0,1,2,3]",
                 "moe.num_experts=2", "train.epochs=2", "train.batch_size=32", "train.lr=1e-2", *FAST]
    rows = run_pretrained_gate_study("mnist10k", {0: pairs}, [0], tmp_path, overrides)

    root = tmp_path / "mnist10k"
    runs = {stage: root / "seed0" / stage for stage in STAGES[:3]}
    runs.update({stage: root / "split0_seed0" / stage for stage in STAGES[3:]})
    singles = [root / "split0_seed0" / f"expert{i}_{a}_{b}" for i, (a, b) in enumerate(pairs)]
    for run in [*runs.values(), *singles]:
        assert (run / "metrics.json").exists(), run

    table_EC = json.loads((runs["pretrained_gate"] / "metrics.json").read_text())["selection_table"]
    routed = [max(range(len(pairs)), key=lambda e: table_EC[e][c]) for pair in pairs for c in pair]
    expected = [e for e, pair in enumerate(pairs) for _ in pair]
    assert sum(r == x for r, x in zip(routed, expected)) >= 3, table_EC

    # Frozen parts are bit-identical to their sources.
    w = {stage: weights(run) for stage, run in runs.items()}
    stacked = {"experts." + k[len("expert."):]: torch.stack([weights(s)[k] for s in singles])
               for k in weights(singles[0]) if k.startswith("expert.")}
    assert_identical(part(w["pretrained_gate"], "experts."), stacked)
    for stage in ("scratch_same_wts", "scratch_rand_wts"):
        assert_identical(part(w[stage], "gate."), part(w["scratch"], "gate."))
    for stage in ("prechosen_same_wts", "prechosen_rand_wts"):
        assert_identical(part(w[stage], "gate."), part(w["pretrained_gate"], "gate."))

    # Same seed => same initial experts: the trainer seeds before it builds.
    configs = {s: from_dict(yaml.safe_load((runs[s] / "config.yaml").read_text())) for s in runs}
    initial = {s: part({k: v.clone() for k, v in build_trainer(configs[s]).model.state_dict().items()}, "experts.")
               for s in ("scratch", "scratch_same_wts", "scratch_rand_wts")}
    assert_identical(initial["scratch"], initial["scratch_same_wts"])
    assert not torch.equal(initial["scratch"]["experts.fc1.weight"],
                           initial["scratch_rand_wts"]["experts.fc1.weight"])
    rand = configs["scratch_rand_wts"].train
    assert (rand.optimizer, rand.momentum) == ("rmsprop", 0.9), "the MNIST notebook's optimizer"
    assert configs["pretrained_gate"].train.freeze == ["experts"]

    assert [r["stage"] for r in rows] == list(STAGES) and all(r["runs"] == 1 for r in rows)
    with open(root / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["stage"] for r in table] == list(STAGES)
    assert float(table[0]["paper_test_error"]) == 0.09
    assert "| gate trained on pretrained experts | 1 |" in (root / "summary.md").read_text()

    # Run again: every stage is finished and skipped; with other settings the root is refused.
    assert run_pretrained_gate_study("mnist10k", {0: pairs}, [0], tmp_path, overrides) == rows
    # Committed results hold config.yaml + metrics.json only: a finished study needs no weights.
    for folder in list(tmp_path.rglob("checkpoints")):
        shutil.rmtree(folder)
    assert run_pretrained_gate_study("mnist10k", {0: pairs}, [0], tmp_path, overrides) == rows
    with pytest.raises(ConfigError, match=r"seed0/scratch holds a finished run with a different config "
                                          r"\(train.batch_size\)"):
        run_pretrained_gate_study("mnist10k", {0: pairs}, [0], tmp_path, [*overrides, "train.batch_size=16"])


# ------------------------------------------------------------------------- experts (A.10)

def test_experts_study_writes_every_row_and_the_figures(tmp_path, data_root):
    """Three of the four runs exist already (trained here in-process) and are reused; the
    fourth is trained by the study in its own process."""
    config = CONFIGS / "mnist" / "vanilla.yaml"
    overrides = [f"data.root={data_root}", "data.name=mnist10k", "data.train_size=300", "data.test_size=200",
                 "train.epochs=1", "train.batch_size=64", "train.progress=false", "train.num_threads=1"]
    root = tmp_path / "study"
    existing = [("lcv", 2), ("lcv", 4), ("ls", 2)]
    for regularizer, E in existing:
        run = experts_run_dir(root, regularizer, E, 0)
        build_trainer(load_config(config, [*overrides, *REGULARIZERS["mnist"][regularizer], f"moe.num_experts={E}",
                                     "seed=0", f"name=study_experts/{regularizer}_e{E}", f"run_dir={run}"])).fit()
    stamps = {run: (run / "metrics.json").stat().st_mtime_ns
              for run in (experts_run_dir(root, r, E, 0) for r, E in existing)}

    assert main(["study", "experts", "--config", str(config), "--experts", "2,4", "--regularizers", "lcv,ls",
                 "--root", str(root), *overrides]) == 0

    for run, stamp in stamps.items():
        assert (run / "metrics.json").stat().st_mtime_ns == stamp, "complete runs are skipped"
    new = experts_run_dir(root, "ls", 4, 0)
    saved = load_config(new / "config.yaml")
    assert (saved.moe.num_experts, saved.loss.ls_beta, saved.loss.ls_gamma) == (4, 1e-5, 1e-4)
    assert saved.name == "study_experts/ls_e4"
    with open(root / "study.csv") as f:
        table = list(csv.DictReader(f))
    assert {(int(r["E"]), r["regularizer"]) for r in table} == {(2, "lcv"), (4, "lcv"), (2, "ls"), (4, "ls")}
    for row in table:
        assert 1 <= float(row["experts_used_mean"]) <= int(row["E"]) and row["seeds"] == "1"
        assert float(row["peak_memory_mb_mean"]) > 0 and float(row["step_seconds_mean"]) > 0
        assert row["experts_used_std"] == "", "one seed: no std"
    assert (root / "study.md").read_text().count("\n| ") == 5
    for name in FIGURE_NAMES:
        png = (root / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name


@pytest.mark.parametrize("argv, message", [
    (["study", "pretrained-gate", "--splits", "0,7"], "--splits 7: mnist10k has splits 0..4"),
    (["study", "pretrained-gate", "--dataset", "cifar100"], "--dataset 'cifar100' is not one of: mnist10k, fmnist_mnist"),
    (["study", "pretrained-gate", "seed=3"], "seed is set by this procedure"),
    (["study", "experts", "--config", "configs/mnist/vanilla.yaml", "moe.num_experts=3"],
     "moe.num_experts is set by this procedure"),
    (["study", "experts", "--config", "configs/mnist/vanilla.yaml", "--regularizers", "l1"],
     "--regularizers 'l1' is not one of: vanilla, lcv, ls, attentive_ls"),
    (["study", "experts", "--config", "configs/mnist/vanilla.yaml", "--experts", "5,10", "--heatmaps", "20"],
     "--heatmaps 20: the study has no run with E = 20; available: 5,10"),
    (["study", "experts", "--config", "configs/mnist/vanilla.yaml", "--heatmap-regularizers", "vanilla"],
     "--heatmap-regularizers 'vanilla': the study has no run of it; available: lcv,ls"),
    (["study", "experts", "--experts", "5"], "--config is required to train the study"),
    (["distill", "no/such/run"], "no/such/run is not a run folder"),
])
def test_procedure_commands_refuse_bad_arguments_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# ------------------------------------------------------------------ dead experts (Section 4.2)

def test_wilson_interval_matches_published_values():
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_dead_experts_study_counts_failures_and_resumes(tmp_path, data_root, capsys):
    overrides = [f"data.root={data_root}", "data.train_size=4000", "data.test_size=300", "train.epochs=10", "train.progress=false", "train.num_threads=1"]
    root = tmp_path / "dead"
    args = ["study", "dead-experts", "--dataset", "mnist10k", "--split", "0", "--seeds", "3,5", "--root", str(root)]
    assert main([*args, *overrides]) == 0
    runs = sorted(root.glob("pair*/seed*/metrics.json"))
    assert len(runs) == 10, "5 pairs x 2 seeds"
    saved = load_config(root / "pair3_8" / "seed5" / "config.yaml")
    assert (saved.model.kind, saved.data.classes, saved.seed, saved.train.lr) == ("single", [3, 8], 5, 1e-3)
    errors = {p.parent: json.loads(p.read_text())["test_error"] for p in runs}
    with open(root / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["pair"] for r in table] == ["0 vs 7", "1 vs 9", "2 vs 4", "3 vs 8", "5 vs 6", "all pairs"]
    assert int(table[-1]["runs"]) == 10
    failed = sum(e > 0.25 for e in errors.values())
    assert 0 < failed < 10, "the settings give both outcomes, so the count is tested"
    assert int(table[-1]["failed"]) == failed
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    assert main([*args, *overrides]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps, "finished runs are not trained again"
    assert main([*args[:-6], "--split", "7", "--root", str(root), *overrides]) != 0
    assert "--split 7: mnist10k has splits 0..4" in capsys.readouterr().err
