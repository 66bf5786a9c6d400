"""The report of `moe-dist study experts` (moe_dist/experiments/study_report.py, study_figures.py):
built with --report-only from run folders alone, over seeds, while points are missing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import REPO
from moe_dist.cli import main
from moe_dist.experiments.study_figures import FIGURE_NAMES, sort_by_class
from moe_dist.experiments.study_report import experts_run_dir

#: A real finished run of the committed mnist10k study: its metrics.json and config.yaml are the template.
TEMPLATE = REPO / "docs" / "results" / "study_experts" / "lcv_e5" / "seed0"
#: A regulariser the code's table does not know: the report takes names from the folders.
OTHER = "ls_b1e-3"
KEYS = ("experts_used", "usage_entropy", "sample_entropy", "mutual_information", "mutual_information_predicted",
        "test_error", "step_seconds", "peak_memory_mb", "comm_bytes_per_step")


def _write_run(root: Path, regularizer: str, E: int, seed: int, rng: np.random.Generator) -> dict:
    """A finished run folder: the template's files, the metrics drawn at random, comm bytes
    only under expert parallelism (E = 8 here)."""
    run = experts_run_dir(root, regularizer, E, seed)
    run.mkdir(parents=True)
    shutil.copy(TEMPLATE / "config.yaml", run / "config.yaml")
    metrics = json.loads((TEMPLATE / "metrics.json").read_text())
    table = rng.integers(0, 50, size=(E, 10))
    metrics.update({k: float(rng.uniform(0.1, 3.0)) for k in KEYS[1:-1]},
                   experts_used=int(rng.integers(1, E + 1)), selection_table=table.tolist(), stack_members=4)
    # epoch times with one paused epoch (100x): the report's step time is the median epoch's
    epochs = rng.uniform(1.0, 2.0, size=len(metrics["history"]))
    epochs[int(rng.integers(len(epochs)))] *= 100
    for record, seconds in zip(metrics["history"], epochs):
        record["epoch_seconds"] = float(seconds)
    metrics["step_seconds"] = float(epochs.sum() / metrics["steps"])  # the mean, as the trainer writes it
    if E == 8:  # the trainer's per-kind record; the report aggregates its total
        kinds = {k: float(rng.uniform(1e5, 1e6)) for k in ("dispatch", "gradients", "other")}
        metrics.update(comm_bytes_per_step={**kinds, "total": sum(kinds.values())}, num_processes=2, ep_size=2)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def _study(root: Path) -> dict[tuple[str, int], list[dict]]:
    """2 E x 2 regularisers x 3 seeds, but OTHER at E = 8 has seed 0 only (seed 1 still training)."""
    rng = np.random.default_rng(0)
    written = {}
    for E in (4, 8):
        for regularizer in ("lcv", OTHER):
            seeds = [0] if (regularizer, E) == (OTHER, 8) else [0, 1, 2]
            written[(regularizer, E)] = [_write_run(root, regularizer, E, s, rng) for s in seeds]
    unfinished = experts_run_dir(root, OTHER, 8, 1)
    unfinished.mkdir()
    shutil.copy(TEMPLATE / "config.yaml", unfinished / "config.yaml")
    return written


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_report_only_gives_mean_and_std_over_seeds_lists_missing_points_and_trains_nothing(tmp_path):
    root = tmp_path / "study"
    written = _study(root)
    before = _files(root)

    assert main(["study", "experts", "--report-only", "--root", str(root), "--experts", "4,8,16", "--heatmaps", "4,8",
                 "--heatmap-regularizers", f"lcv,{OTHER}"]) == 0

    after = _files(root)
    assert {p: t for p, t in after.items() if p in before} == before, "run folders untouched"
    assert sorted(p.name for p in set(after) - set(before)) == sorted(["study.csv", "study.md", *FIGURE_NAMES])
    rows = list(csv.DictReader((root / "study.csv").open()))
    assert list(rows[0])[:3] == ["E", "regularizer", "seeds"]
    assert [(int(r["E"]), r["regularizer"], int(r["seeds"])) for r in rows] == [
        (4, "lcv", 3), (4, OTHER, 3), (8, "lcv", 3), (8, OTHER, 1)]
    for row in rows:
        runs = written[(row["regularizer"], int(row["E"]))]
        for key in KEYS:
            values = [m[key]["total"] if key == "comm_bytes_per_step" else m[key] for m in runs if key in m]
            if key == "step_seconds":  # the median epoch's, not the pause-inflated mean
                values = [np.median([h["epoch_seconds"] for h in m["history"]]) * len(m["history"]) / m["steps"]
                          for m in runs]
                assert all(v < 0.5 * m["step_seconds"] for v, m in zip(values, runs))
            if not values:
                assert row[f"{key}_mean"] == row[f"{key}_std"] == "", key
                continue
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), rel=1e-12), key
            if len(values) == 1:
                assert row[f"{key}_std"] == "", key
            else:
                assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-12), key
        assert float(row["stack_members_mean"]) == 4
        effective = [2.0 ** m["usage_entropy"] for m in runs]  # the perplexity of the usage
        assert float(row["effective_experts_mean"]) == pytest.approx(np.mean(effective), rel=1e-12)
    report = (root / "study.md").read_text()
    assert f"- {OTHER} E=8: 1 of 3 seeds (missing seed 1, 2)" in report
    assert f"- E=16: no finished run (lcv, {OTHER}: 0 of 3 seeds)" in report  # asked for, not there yet
    assert report.count("\n| ") == 1 + len(rows) and "bytes sent/step" in report and "2 (ep 2)" in report
    assert "| experts used | 2^H_u | H_u |" in report
    assert "whole stack's" in report
    for name in FIGURE_NAMES:
        image = imread(root / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400, name


def test_report_only_refuses_a_heatmap_expert_count_without_runs_in_one_line(tmp_path, capsys):
    root = tmp_path / "study"
    _study(root)
    assert main(["study", "experts", "--report-only", "--root", str(root), "--heatmaps", "4,16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--heatmaps 16: the study has no run with E = 16; available: 4,8" in err and "\n" not in err
    assert not (root / "study.md").exists()
    assert main(["study", "experts", "--report-only", "--root", str(tmp_path / "none")]) == 2
    assert "no study run folders there" in capsys.readouterr().err


def test_heatmap_rows_are_sorted_by_most_frequent_class_and_normalised_per_class():
    table_EC = [[0, 0, 0], [1, 9, 0], [8, 0, 2], [0, 1, 0], [5, 0, 0]]
    order, shares = sort_by_class(table_EC)
    assert order.tolist() == [2, 4, 1, 3, 0]  # class 0 (most first), class 1, then the unused expert
    assert np.allclose(shares.sum(axis=0), 1.0)
    assert shares[0].tolist() == pytest.approx([8 / 14, 0, 1.0])
