"""`moe-dist sweep` (job expansion, resumable runs, --index, failures, file errors) and
`moe-dist report` (grouping, table values, std modes, CSV, figures)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, REPO
from moe_dist.cli import main
from moe_dist.config import load_config, save_config
from moe_dist.errors import ConfigError
from moe_dist.experiments import report
from moe_dist.experiments.report import write_report
from moe_dist.experiments.sweep import SWEEPS_ROOT, expand, load_sweep
from moe_dist.rundir import RunDir

SYNTHETIC_MOE = str(CONFIGS / "synthetic" / "s1_moe_nonlinear.yaml")
TINY = ["data.train_size=500", "data.test_size=200", "train.epochs=2", "train.progress=false"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_sweep(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------- sweep: expansion and errors


def test_jobs_expand_members_grid_points_and_seeds_in_file_order(tmp_path, capsys):
    root = tmp_path / "runs"
    sweep_file = write_sweep(tmp_path / "s.yaml", {
        "root": str(root), "seeds": [0, 1], "overrides": ["train.epochs=3"],
        "members": [
            {"name": "plain", "config": SYNTHETIC_MOE, "overrides": ["train.init_from={root}/pre/seed{seed}"]},
            {"name": "grid", "config": SYNTHETIC_MOE,
             "grid": {"loss.importance_weight": [0.2, 0.4], "train.lr": [0.01]}},
            {"name": "dist", "config": SYNTHETIC_MOE, "distill": "grid"},
            {"name": "again", "config": SYNTHETIC_MOE, "distill": "dist", "grid": {"train.epochs": [7]}},
        ]})
    jobs = expand(load_sweep(sweep_file), overrides=("train.lr=0.5",))
    assert [job.label for job in jobs] == [
        "plain/seed0", "plain/seed1",
        "grid/importance_weight=0.2,lr=0.01/seed0", "grid/importance_weight=0.2,lr=0.01/seed1",
        "grid/importance_weight=0.4,lr=0.01/seed0", "grid/importance_weight=0.4,lr=0.01/seed1",
        "dist/importance_weight=0.2,lr=0.01/seed0", "dist/importance_weight=0.2,lr=0.01/seed1",
        "dist/importance_weight=0.4,lr=0.01/seed0", "dist/importance_weight=0.4,lr=0.01/seed1",
        "again/importance_weight=0.2,lr=0.01,epochs=7/seed0", "again/importance_weight=0.2,lr=0.01,epochs=7/seed1",
        "again/importance_weight=0.4,lr=0.01,epochs=7/seed0", "again/importance_weight=0.4,lr=0.01,epochs=7/seed1",
    ]
    assert [job.index for job in jobs] == list(range(14))
    assert jobs[3].run_dir == root / "grid" / "importance_weight=0.2,lr=0.01" / "seed1"
    # File overrides, member overrides, grid point, command line, then the layout keys.
    assert jobs[1].command[3:] == ("train", "--config", SYNTHETIC_MOE, "train.epochs=3",
                                   f"train.init_from={root}/pre/seed1", "train.lr=0.5",
                                   f"run_dir={root}/plain/seed1", "seed=1")
    assert jobs[3].command[-5:-2] == ("loss.importance_weight=0.2", "train.lr=0.01", "train.lr=0.5")
    source = root / "grid" / "importance_weight=0.4,lr=0.01" / "seed1"
    assert jobs[9].command[3:7] == ("distill", "--config", SYNTHETIC_MOE, str(source))
    assert jobs[9].source == source
    assert jobs[13].source == root / "dist" / "importance_weight=0.4,lr=0.01" / "seed1"
    assert jobs[13].command[-4:-2] == ("train.epochs=7", "train.lr=0.5")

    assert [job.label for job in expand(load_sweep(sweep_file), seeds=(5,), only=("plain",))] == ["plain/seed5"]
    (jobs[0].run_dir).mkdir(parents=True)
    (jobs[0].run_dir / "metrics.json").write_text("{}")
    (jobs[1].run_dir / "checkpoints").mkdir(parents=True)
    (jobs[1].run_dir / "checkpoints" / "latest.json").write_text("{}")
    assert main(["sweep", str(sweep_file), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 14
    assert listed[0].split()[:3] == ["0", "done", "plain/seed0"]
    assert listed[1].split()[:2] == ["1", "resumable"] and listed[2].split()[:2] == ["2", "pending"]
    assert main(["sweep", str(sweep_file), "--dry-run", "--index", "4", "seed=9"]) == 0
    (command,) = capsys.readouterr().out.splitlines()
    assert "loss.importance_weight=0.4" in command and command.endswith("seed=0")


@pytest.mark.parametrize("spec, message", [
    ({"root": "r", "members": [{"name": "a", "config": SYNTHETIC_MOE}], "seed": [1]}, "unknown key 'seed'"),
    ({"root": "r", "members": [{"name": "a", "config": SYNTHETIC_MOE, "grids": {}}]},
     "unknown key 'grids' in member 'a'"),
    ({"root": "r", "members": [{"name": "a", "config": "missing.yaml"}]}, "config file missing.yaml does not exist"),
    ({"root": "r", "members": [{"name": "d", "config": SYNTHETIC_MOE, "distill": "a"},
                               {"name": "a", "config": SYNTHETIC_MOE}]}, "distills 'a', which is not a member defined before"),
    ({"root": "r", "members": [{"name": "a", "config": SYNTHETIC_MOE}] * 2}, "member name 'a' is used twice"),
    ({"root": "r", "seeds": [0, "x"], "members": [{"name": "a", "config": SYNTHETIC_MOE}]}, "seeds must be"),
    ({"root": "r", "members": [{"name": "a", "config": SYNTHETIC_MOE, "grid": {"train.lr": 0.1}}]},
     "train.lr must map to a non-empty list"),
    ({"root": "r", "overrides": ["root=/tmp/x"], "members": [{"name": "a", "config": SYNTHETIC_MOE}]},
     "member 'a': override: unknown key 'root'"),
    ({"root": "r", "members": [{"name": "a", "config": SYNTHETIC_MOE, "overrides": ["moe.num_experts=many"]}]},
     "member 'a': override: bad value for 'moe.num_experts'"),
])
def test_sweep_file_errors_are_one_line_before_anything_runs(tmp_path, capsys, spec, message):
    sweep_file = write_sweep(tmp_path / "s.yaml", spec)
    with pytest.raises(ConfigError, match=message):
        expand(load_sweep(sweep_file))
    assert main(["sweep", str(sweep_file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_root_defaults_under_runs_and_root_option_replaces_it_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep_file = write_sweep(tmp_path / "mine.yaml", {"members": [{"name": "a", "config": SYNTHETIC_MOE}]})
    assert [job.run_dir for job in expand(load_sweep(sweep_file))] == [Path("runs/sweeps/mine/a/seed0")]
    assert main(["sweep", str(sweep_file), "--root", "elsewhere", "--seeds", "3", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("run_dir=elsewhere/a/seed3 seed=3")
    # A command-line override the jobs would reject is refused at once, naming it.
    for mode in ("--dry-run", "--list", "--index=0"):
        assert main(["sweep", str(sweep_file), mode, "--root", "elsewhere", "root=/tmp/x"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
        assert "mine.yaml: member 'a': override: unknown key 'root'" in captured.err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()


# Where the committed runs of each shipped sweep file are (docs/results/README.md).
COMMITTED_ROOTS = {"fmnist_table7.yaml": "docs/results/fmnist", "fmnist_table7_gpu.yaml": "docs/results/fmnist_gpu",
                   "mnist10k_table2.yaml": "docs/results/mnist10k", "synthetic_s1.yaml": "docs/results/synthetic"}


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load_and_expand(path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # their paths are relative to the repository root
    assert path.read_text().startswith(f"# moe-dist sweep configs/sweeps/{path.name}")
    sweep = load_sweep(path)
    jobs = expand(sweep)  # checks that every config file exists and every override's key
    assert jobs and len({job.run_dir for job in jobs}) == len(jobs)
    # By default a sweep writes under runs/, never among the committed results.
    assert Path(sweep.root).parent == SWEEPS_ROOT and "docs" not in Path(sweep.root).parts
    # Named explicitly, the committed root holds every job finished (the file says how).
    committed = COMMITTED_ROOTS[path.name]
    assert f"--root {committed}" in path.read_text()
    assert [job.status() for job in expand(load_sweep(path, committed))] == ["done"] * len(jobs)


# ---------------------------------------------------------------- sweep: real runs


@pytest.mark.slow  # one committed run again: 164 full-batch steps, 60-90 s on 2 shared cores
def test_a_shipped_sweep_reproduces_its_committed_run(tmp_path, capsys, monkeypatch):
    """`moe-dist sweep FILE --only MEMBER --seeds S --root DIR` re-runs one of the committed
    docs/results runs (the cheapest: s1 MoE nonlinear, seed 9, stopped early after 164 steps)
    and gets its metrics: counts exactly, float sums to 1e-6 relative (another CPU may differ
    in their last bits). train.num_threads=2: the thread count of the committed run, whose
    config says 0 (torch's default, 2 on its 2 cores), so a larger machine sums alike."""
    monkeypatch.chdir(REPO)  # the sweep file's paths are relative to the repository root
    member, seed = "s1_moe_nonlinear", 9
    committed = RunDir(REPO / "docs" / "results" / "synthetic" / member / f"seed{seed}")
    assert main(["sweep", "configs/sweeps/synthetic_s1.yaml", "--only", member, "--seeds", str(seed),
                 "--root", str(tmp_path), "train.num_threads=2"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"[0] {member}/seed{seed} ... done")
    run = RunDir(tmp_path / member / f"seed{seed}")
    ours, theirs = run.read_metrics(), committed.read_metrics()
    counts = ("epoch", "test_error", "train_error", "epochs_completed", "stopped_early_at", "steps", "experts_used")
    sums = ("test_loss", "train_loss", "train_nll", "dispatch_entropy", "test_dispatch_entropy", "sample_entropy",
            "usage_entropy", "mutual_information", "mutual_information_predicted")
    assert len(ours["history"]) == len(theirs["history"]) == 165
    # The summary, then every epoch's record (the stopping epoch's train_error is NaN).
    pairs = [("final", ours, theirs)]
    pairs += [(f"epoch {b['epoch']}", a, b) for a, b in zip(ours["history"], theirs["history"])]
    for where, a, b in pairs:
        assert set(a) & {*counts, *sums} == set(b) & {*counts, *sums}, where
        for key in set(b) & set(counts):
            assert a[key] == b[key] or math.isnan(a[key]) and math.isnan(b[key]), (where, key)
        for key in set(b) & set(sums):
            assert a[key] == pytest.approx(b[key], rel=1e-6, nan_ok=True), (where, key)
    mine, original = run.read_config(), committed.read_config()
    mine.run_dir, mine.train.num_threads = original.run_dir, original.train.num_threads
    assert mine == original


def test_sweep_index_runs_only_that_job_and_a_rerun_skips_finished_jobs(tmp_path, capsys):
    root = tmp_path / "runs"
    sweep_file = write_sweep(tmp_path / "s.yaml", {
        "root": str(root), "seeds": [0], "overrides": TINY,
        "members": [{"name": "bad", "config": SYNTHETIC_MOE, "overrides": ["moe.num_experts=0"]},
                    {"name": "good", "config": SYNTHETIC_MOE, "grid": {"train.lr": [0.001, 0.002]}}]})
    first, second = root / "good" / "lr=0.001" / "seed0", root / "good" / "lr=0.002" / "seed0"

    assert main(["sweep", str(sweep_file), "--index", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[2] good/lr=0.002/seed0 ... done")
    assert (second / "metrics.json").exists() and not first.exists() and not (root / "bad").exists()
    assert yaml.safe_load((second / "config.yaml").read_text())["train"]["lr"] == 0.002
    finished = (second / "metrics.json").stat().st_mtime_ns

    # The failing member is reported, the others still run, the exit status says so.
    assert main(["sweep", str(sweep_file)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[0] bad/seed0 ... failed (exit 2)")
    assert "moe.num_experts=0 must be a positive integer" in out[0]
    assert out[1].startswith("[1] good/lr=0.001/seed0 ... done")
    assert out[2].startswith("[2] good/lr=0.002/seed0 ... skipped")
    assert out[3].endswith("2/3 jobs done or skipped, 1 failed: bad/seed0")
    assert (first / "metrics.json").exists() and (second / "metrics.json").stat().st_mtime_ns == finished
    assert "must be a positive integer" in (root / "bad" / "seed0" / "sweep.log").read_text()

    again = (first / "metrics.json").stat().st_mtime_ns
    assert main(["sweep", str(sweep_file), "--only", "good"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" ... ")[1].split()[0] for line in out[:2]] == ["skipped", "skipped"]
    assert (first / "metrics.json").stat().st_mtime_ns == again

    # A real (tiny) training run reports too; the failed run's folder is not a run.
    write_report([str(root)], tmp_path / "report")
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert [(r["group"], r["n"]) for r in rows] == [("synthetic/s1_moe_nonlinear (lr=0.001)", "1"),
                                                     ("synthetic/s1_moe_nonlinear (lr=0.002)", "1")]
    metrics = json.loads((first / "metrics.json").read_text())
    assert float(rows[0]["dispatch_entropy_mean"]) == pytest.approx(metrics["dispatch_entropy"])
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| s1_moe_nonlinear (lr=0.001) | 1 |" in markdown and "test acc %" in markdown
    assert (tmp_path / "report" / "figures" / "curves_synthetic.png").read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------- report


def fake_run(folder: Path, name: str, seed: int, test_error: float, train_error: float, *overrides: str) -> None:
    """A run folder as the trainer leaves it: resolved config.yaml and metrics.json."""
    folder.mkdir(parents=True)
    cfg = load_config(None, [f"name={name}", f"seed={seed}", f"run_dir={folder}", "data.name=fashion_mnist",
                             "model.arch=fmnist", *overrides])
    save_config(cfg, folder / "config.yaml")
    moe = cfg.model.kind == "moe"
    metrics = {
        "test_error": test_error, "train_error": train_error, "wall_seconds": 10.0 + seed,
        "hardware": "x86_64 CPU, 2 threads", "torch": "2.13.0+cpu",
        "history": [{"epoch": e, "train_loss": 1.0, "train_error": 0.5, "test_error": test_error + 0.1 / (e + 1)}
                    for e in range(3)],
    }
    if moe:
        metrics.update(mutual_information=2.0 + seed / 10, sample_entropy=0.1, usage_entropy=2.3,
                       selection_table=[[seed + e + c for c in range(10)] for e in range(5)])
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def fake_runs(tmp_path) -> tuple[Path, dict[str, list[tuple[float, float]]]]:
    """fmnist: vanilla_lcv at two importance weights (3 and 2 seeds), vanilla, single (no MoE metrics)."""
    root = tmp_path / "runs"
    expected: dict[str, list[tuple[float, float]]] = {}
    for weight, seeds in ((0.2, 3), (0.4, 2)):
        for seed in range(seeds):
            test, train = 0.10 + 0.013 * seed + weight / 10, 0.05 - 0.01 * seed - (0.02 if weight == 0.4 else 0)
            fake_run(root / "vanilla_lcv" / f"importance_weight={weight}" / f"seed{seed}", "fmnist/vanilla_lcv",
                     seed, test, train, f"loss.importance_weight={weight}")
            expected.setdefault(f"vanilla_lcv (importance_weight={weight})", []).append((test, train))
    for seed in range(2):
        fake_run(root / "vanilla" / f"seed{seed}", "fmnist/vanilla", seed, 0.11 + 0.02 * seed, 0.04)
        expected.setdefault("vanilla", []).append((0.11 + 0.02 * seed, 0.04))
        fake_run(root / "single" / f"seed{seed}", "fmnist/single", seed, 0.15 - 0.01 * seed, 0.1, "model.kind=single")
        expected.setdefault("single", []).append((0.15 - 0.01 * seed, 0.1))
    return root, expected


def table_rows(markdown: str) -> dict[str, list[str]]:
    """First-column cell (without the family-best mark) -> cells, for every body row."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("method", "---"):
            rows[cells[0].removesuffix(" *")] = cells
    return rows


def test_report_table_has_a_row_per_group_with_n_mean_std_and_paper_values(fake_runs, tmp_path):
    root, expected = fake_runs
    out = tmp_path / "out"
    assert main(["report", str(root), "--out", str(out), "--title", "FMNIST check"]) == 0
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# FMNIST check")
    assert "sample std (ddof=1) over the seeds of this configuration" in markdown
    assert "x86_64 CPU, 2 threads (9 runs)" in markdown and "torch 2.13.0+cpu" in markdown
    rows = table_rows(markdown)
    # The paper's order: single, vanilla, vanilla_lcv grid points by value.
    assert list(rows) == ["single", "vanilla", "vanilla_lcv (importance_weight=0.2)",
                          "vanilla_lcv (importance_weight=0.4)"]
    for label, runs in expected.items():
        tests = [t for t, _ in runs]
        cells = rows[label]
        assert cells[1] == str(len(runs))
        assert cells[3] == f"{statistics.fmean(tests):.4f} ± {statistics.stdev(tests):.4f}"
        best_test = min(runs, key=lambda r: r[1])[0]  # the paper's rule: lowest final train error
        assert cells[4] == f"{best_test:.4f}"
    assert rows["single"][5] == "–"  # no I(E;Y) for a single model
    assert rows["vanilla_lcv (importance_weight=0.2)"][10] == "0.103 ± 0.006"  # docs/papers.md A.9
    # The family's best run by training error is in the 0.4 row.
    assert "| vanilla_lcv (importance_weight=0.4) * |" in markdown

    with (out / "report.csv").open() as f:
        csv_rows = {r["group"]: r for r in csv.DictReader(f)}
    assert set(csv_rows) == {f"fmnist/{label}" for label in expected}
    for label, runs in expected.items():
        row = csv_rows[f"fmnist/{label}"]
        tests = [t for t, _ in runs]
        assert int(row["n"]) == len(runs)
        assert float(row["test_error_mean"]) == pytest.approx(statistics.fmean(tests))
        assert float(row["test_error_std"]) == pytest.approx(statistics.stdev(tests))
    assert float(csv_rows["fmnist/vanilla"]["paper_test_error"]) == 0.104
    assert csv_rows["fmnist/single"]["mutual_information_mean"] == ""

    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["curves_fmnist.png", "selection_fmnist_vanilla.png",
                       "selection_fmnist_vanilla_lcv_importance_weight_0.2.png",
                       "selection_fmnist_vanilla_lcv_importance_weight_0.4.png"]
    for name in figures:
        assert (out / "figures" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"](figures/{name})" in markdown


def test_report_family_std_is_over_all_runs_of_the_name(fake_runs, tmp_path):
    root, expected = fake_runs
    write_report([str(root)], tmp_path / "out", std_over="family")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "family-wide std" in markdown and "over the seeds of this configuration" not in markdown
    family = [t for label, runs in expected.items() if label.startswith("vanilla_lcv") for t, _ in runs]
    rows = table_rows(markdown)
    for weight in (0.2, 0.4):
        runs = expected[f"vanilla_lcv (importance_weight={weight})"]
        assert rows[f"vanilla_lcv (importance_weight={weight})"][3] == (
            f"{statistics.fmean(t for t, _ in runs):.4f} ± {statistics.stdev(family):.4f}")
    csv_rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert {r["std_over"] for r in csv_rows} == {"family"}


def test_report_groups_distillations_by_source_configuration(tmp_path):
    root = tmp_path / "runs"
    for weight in (0.2, 0.4):
        for seed in range(2):
            source = root / "src" / f"importance_weight={weight}" / f"seed{seed}"
            fake_run(root / "dist" / f"importance_weight={weight}" / f"seed{seed}", "fmnist/distilled_lcv",
                     seed, 0.1, 0.05, f"train.init_from={source}")
    write_report([str(root / "dist")], tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [(r["params"], r["n"]) for r in rows] == [("from src/importance_weight=0.2", "2"),
                                                     ("from src/importance_weight=0.4", "2")]


def test_report_groups_runs_made_before_a_config_key_existed_with_new_ones(tmp_path):
    # a config.yaml written before train.deterministic existed holds the default's run
    fake_run(tmp_path / "vanilla" / "seed0", "fmnist/vanilla", 0, 0.11, 0.04)
    fake_run(tmp_path / "vanilla" / "seed1", "fmnist/vanilla", 1, 0.12, 0.05)
    old = tmp_path / "vanilla" / "seed0" / "config.yaml"
    config = yaml.safe_load(old.read_text())
    del config["train"]["deterministic"]
    old.write_text(yaml.safe_dump(config))
    [group] = report.group_runs(report.find_runs([str(tmp_path)]))
    assert group.params == () and len(group.runs) == 2


def test_report_without_runs_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no run folders" in capsys.readouterr().err
