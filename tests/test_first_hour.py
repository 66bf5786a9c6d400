"""What a new user meets in the first hour: a way back from a damaged checkpoint, no silent
overwrites, Ctrl+C like SIGTERM, honest labels, a line per epoch, each value once in
TensorBoard, and a report that says what it left out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIGS, REPO, tiny_synthetic
from moe_dist.cli import main
from moe_dist.config import load_config
from moe_dist.errors import CheckpointError, ConfigError
from moe_dist.rundir import RunDir
from moe_dist.train.build import build_trainer
from moe_dist.train.preemption import PREEMPTED_EXIT_CODE

SYNTHETIC_MOE = str(CONFIGS / "synthetic" / "s1_moe_nonlinear.yaml")


def _train(run_dir, *extra):
    return build_trainer(load_config(SYNTHETIC_MOE, tiny_synthetic(run_dir, *extra))).fit()


def _without_timing(history):
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


def test_a_truncated_latest_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    straight = _train(tmp_path / "straight", "train.epochs=4")
    _train(tmp_path / "run", "train.epochs=3")
    run = RunDir(tmp_path / "run")
    newest = run.checkpoints / "epoch_0003.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    capsys.readouterr()
    resumed = _train(run.path, "train.epochs=4")
    err = capsys.readouterr().err
    assert "skipped" in err and "epoch_0003.pt is corrupt or was modified" in err and "from epoch_0002.pt" in err
    assert f"resumed {run.path} after epoch 2" in err
    assert _without_timing(resumed["history"]) == _without_timing(straight["history"])


def test_missing_latest_json_uses_the_newest_checkpoint_that_verifies(tmp_path, capsys):
    _train(tmp_path / "run", "train.epochs=3")
    run = RunDir(tmp_path / "run")
    (run.checkpoints / "latest.json").unlink()
    capsys.readouterr()
    resumed = _train(run.path, "train.epochs=4")
    assert f"resumed {run.path} after epoch 3" in capsys.readouterr().err
    assert resumed["epochs_completed"] == 4 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]


def test_no_checkpoint_that_verifies_is_refused_not_overwritten(tmp_path):
    _train(tmp_path / "run", "train.epochs=2")
    run = RunDir(tmp_path / "run")
    for path in run.checkpoints.glob("epoch_*.pt"):
        path.write_bytes(b"garbage")
    before = run.metrics_path.read_bytes()
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies.*--overwrite"):
        _train(run.path, "train.epochs=3")
    assert run.metrics_path.read_bytes() == before


def test_finished_metrics_without_checkpoint_is_refused_and_overwrite_starts_again(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    args = ["train", "--config", SYNTHETIC_MOE, *tiny_synthetic(run.path, "train.epochs=2")]
    assert main(args) == 0
    import shutil
    shutil.rmtree(run.checkpoints)  # as committed results hold them: config.yaml + metrics.json
    before = run.metrics_path.read_bytes()
    assert main([*args[:3], *tiny_synthetic(run.path, "train.epochs=3")]) == 2
    assert "holds a finished run's metrics.json but no checkpoint" in capsys.readouterr().err
    assert run.metrics_path.read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
    assert run.has_checkpoint() and json.loads(run.metrics_path.read_text())["epochs_completed"] == 2


def test_a_finished_run_is_not_trained_or_rewritten_again(tmp_path, capsys):
    first = _train(tmp_path / "run", "train.epochs=2")
    run = RunDir(tmp_path / "run")
    before = run.metrics_path.read_bytes()
    capsys.readouterr()
    again = _train(run.path, "train.epochs=2")
    assert "is finished (train.epochs=2): nothing to train" in capsys.readouterr().err
    assert run.metrics_path.read_bytes() == before and again == json.loads(before) and again["steps"] == first["steps"]


def test_fewer_epochs_than_trained_is_refused(tmp_path):
    _train(tmp_path / "run", "train.epochs=3")
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="has trained 3 epochs, more than train.epochs=2"):
        _train(tmp_path / "run", "train.epochs=2")
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_one_line_per_epoch_without_a_progress_bar_and_early_stopping_is_announced(tmp_path, capsys):
    metrics = _train(tmp_path / "run", "train.epochs=3", "train.eval_every=2", "train.early_stop_loss=0",
                     "train.early_stop_rise=0")
    err = capsys.readouterr().err.splitlines()
    epochs = [line for line in err if line.startswith("epoch ")]
    assert [line.split(",")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "test error" not in epochs[0] and f"test error {metrics['history'][1]['test_error']:.4f}" in epochs[1]
    assert all(f"train loss {h['train_loss']:.4f}" in line for h, line in zip(metrics["history"], epochs))
    # a threshold every step's loss (about ln 2) is below: stops in the first step of epoch 1
    stopped = _train(tmp_path / "stopped", "train.epochs=5", "train.early_stop_loss=0.9")
    err = capsys.readouterr().err
    assert "early stopping in epoch 1 of 5: training loss 0.6931 <= train.early_stop_loss=0.9" in err
    assert stopped["stopped_early_at"] == 1 and stopped["epochs_completed"] == 1


def test_each_value_reaches_tensorboard_once(tmp_path):
    _train(tmp_path / "run", "train.epochs=2")
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/error", "eval/error", "eval/loss", "moe/usage_entropy"} <= tags
    # evaluation copies in the history and the task loss equal to the whole loss: not again
    assert not tags & {"train/test_error", "train/test_loss", "train/usage_entropy", "train/nll",
                       "train/mutual_information", "train/sample_entropy", "train/experts_used"}
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_eval_labels_the_split_and_the_paper_column_only_for_the_papers_setting(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", SYNTHETIC_MOE, *tiny_synthetic(run, "train.epochs=2")]) == 0
    out = capsys.readouterr().out
    assert "paper column left out: this run is not the paper's setting: data.train_size=1000 (paper: 0)" in out
    assert "99.46" not in out  # the paper's accuracy is not shown beside a 2-epoch run
    assert main(["eval", str(run), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "train_error" in out and "train accuracy %" in out and "test accuracy" not in out
    assert "test_error" not in out
    assert "paper column left out: the paper reports test-set values" in out


def test_a_distillation_config_refuses_train_with_a_pointer(tmp_path, capsys):
    config = str(CONFIGS / "fmnist" / "distilled_lcv.yaml")
    assert main(["train", "--config", config, f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"moe-dist distill SOURCE_RUN --config {config}" in err
    assert not any(tmp_path.iterdir())


def test_report_prints_its_table_and_lists_what_it_left_out(tmp_path, capsys):
    _train(tmp_path / "runs" / "done", "train.epochs=2")
    unfinished = RunDir(tmp_path / "runs" / "unfinished")
    unfinished.write_config(load_config(SYNTHETIC_MOE, tiny_synthetic(unfinished.path)))
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "| s1_moe_nonlinear | 1 |" in out and "## Figures" not in out
    assert f"left out 1 unfinished run folder(s) (no complete metrics.json): {unfinished.path}" in out


def test_ctrl_c_checkpoints_like_sigterm_and_the_same_command_resumes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moe_dist.cli", "train", "--config", SYNTHETIC_MOE,
           *tiny_synthetic(run, "train.batch_size=50", "train.epochs=20", "train.early_stop_rise=0",
                           "train.early_stop_loss=0")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pointer = run / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not pointer.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("moe-dist:")] == [
        next(line for line in err.splitlines() if line.startswith("moe-dist: preempted by SIGINT: stopped after step"))]
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"resumed {run} after epoch" in resumed.stderr
    assert RunDir(run).read_metrics()["epochs_completed"] == 20
