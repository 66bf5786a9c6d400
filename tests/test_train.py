"""End-to-end training: run folder contents, TensorBoard read-back, exact resumption, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIGS, tiny_mnist, tiny_synthetic
from moe_dist.cli import main
from moe_dist.config import load_config
from moe_dist.errors import CheckpointError, ConfigError
from moe_dist.train.checkpoint import load_checkpoint
from moe_dist.train.build import build_trainer

SYNTHETIC_MOE = CONFIGS / "synthetic" / "s1_moe_nonlinear.yaml"


def train(config, overrides):
    cfg = load_config(config, overrides)
    return build_trainer(cfg).fit()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints")["model"]


def test_run_folder_holds_the_documented_interface(tmp_path, data_root):
    run = tmp_path / "run"
    metrics = train(CONFIGS / "mnist" / "vanilla_lcv.yaml", tiny_mnist(run, data_root))
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("test_error", "mutual_information", "sample_entropy", "usage_entropy", "selection_table", "history"):
        assert key in saved, key
    assert saved == json.loads(json.dumps(metrics))
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3]  # epochs completed, from 1 (as epoch_0001.pt)
    assert all({"train_loss", "test_error"} <= h.keys() for h in saved["history"])
    table = saved["selection_table"]
    assert len(table) == 5 and len(table[0]) == 10 and sum(map(sum, table)) == 500
    # It learns in 3 short epochs: chance is 0.886 here (10 classes, the largest 11.4% of these
    # 500 test images). Measured: 0.866 after epoch 1, 0.748 after 3 (seeds 1-7: 0.59-0.77 after
    # 3, each at least 0.11 below its first epoch); a model that does not learn stays near 0.89.
    first_error = saved["history"][0]["test_error"]
    assert saved["test_error"] < 0.82 and saved["test_error"] < first_error - 0.05, saved["history"]
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["importance_weight"] == 0.2
    assert (run / "checkpoints" / "latest.json").exists()

    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/importance", "eval/error", "moe/usage_entropy", "moe/mutual_information"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert [e.step for e in events.Scalars("eval/error")] == [1, 2, 3]  # epochs completed, from 1
    assert events.Scalars("eval/error")[-1].value == pytest.approx(saved["test_error"], abs=1e-6)
    assert "moe/selection_table" in tags["images"]
    # one process sends nothing: no bytes field, no bytes curves (tests/test_traffic.py: two)
    assert "comm_bytes_per_step" not in saved
    assert not [t for t in tags["scalars"] if t.startswith("perf/comm_bytes")]


def test_eval_command_reproduces_final_metrics(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    metrics = train(CONFIGS / "mnist" / "attentive.yaml", tiny_mnist(run, data_root, "train.epochs=1"))
    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["error"] == pytest.approx(metrics["test_error"], abs=1e-9)
    assert evaluated["selection_table"] == metrics["selection_table"]


@pytest.mark.parametrize("config, make", [
    (SYNTHETIC_MOE, lambda run, root: tiny_synthetic(run)),  # routing noise: RNG state must resume
    (CONFIGS / "mnist" / "attentive_ls.yaml", lambda run, root: tiny_mnist(run, root, "train.epochs=4")),
], ids=["synthetic-noisy-topk", "mnist-attentive-ls"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, data_root, config, make):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cpu = ["train.device=cpu"]  # bit-identical on a GPU needs train.deterministic (test_gpu.py)
    full = train(config, make(straight, data_root) + cpu)
    train(config, make(resumed, data_root) + cpu + ["train.epochs=2"])  # "interrupted" after epoch 2
    again = train(config, make(resumed, data_root) + cpu)  # restarted: resumes without extra flags
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    strip = lambda hist: [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in hist]
    assert strip(full["history"]) == strip(again["history"])
    assert full["test_error"] == again["test_error"]


def test_resume_with_a_different_config_is_refused(tmp_path):
    run = tmp_path / "run"
    train(SYNTHETIC_MOE, tiny_synthetic(run, "train.epochs=1"))
    with pytest.raises(ConfigError, match="different config .*moe.num_experts"):
        train(SYNTHETIC_MOE, tiny_synthetic(run, "moe.num_experts=4"))


def test_tampered_checkpoint_stops_resume_and_keeps_files(tmp_path):
    run = tmp_path / "run"
    train(SYNTHETIC_MOE, tiny_synthetic(run, "train.epochs=1"))
    path = next((run / "checkpoints").glob("epoch_*.pt"))
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or was modified"):
        train(SYNTHETIC_MOE, tiny_synthetic(run))
    assert path.read_bytes() == bytes(data), "the evidence is kept, not overwritten"


def test_killed_process_resumes_from_last_good_checkpoint(tmp_path):
    """SIGKILL a real training process mid-run; the restart ends where an uninterrupted run does."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = tiny_synthetic(killed, "train.epochs=60", "data.train_size=4000", "train.eval_every=100")
    cmd = [sys.executable, "-m", "moe_dist.cli", "train", "--config", str(SYNTHETIC_MOE), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    epoch = load_checkpoint(killed / "checkpoints")["state"]
    assert json.loads(epoch)["epoch"] >= 5
    resumed = train(SYNTHETIC_MOE, args)
    full = train(SYNTHETIC_MOE, [a.replace(str(killed), str(straight)) for a in args])
    a, b = final_weights(straight), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_error"] == full["test_error"]


def test_init_from_rejects_mismatched_shapes(tmp_path):
    source = tmp_path / "source"
    train(SYNTHETIC_MOE, tiny_synthetic(source, "train.epochs=1"))
    with pytest.raises(CheckpointError, match="has shape"):
        train(SYNTHETIC_MOE, tiny_synthetic(tmp_path / "target", f"train.init_from={source}", "model.width=4"))


def test_default_train_command_runs_the_embedded_synthetic_experiment(tmp_path, capsys):
    assert main(["train", f"run_dir={tmp_path}", "data.train_size=2000", "data.test_size=1000",
                 "train.epochs=30", "train.progress=false"]) == 0
    out = capsys.readouterr().out
    assert "synthetic/s1_moe_nonlinear" in out and "test accuracy %" in out and "dispatch_entropy" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dispatch_entropy"] is not None
    # 30 of the config's 501 full-batch epochs: the model learns (test error 0.283, seeds 1-3
    # 0.284-0.297; chance is 0.5 on the 2 balanced labels) but the router has not specialised
    # yet: dispatch entropy 1.38 -> 1.363 nats, where ln 4 = 1.386 is a router blind to the 4
    # clusters (the paper's 0.098 needs the full run). So the entropy is checked as reported:
    # the last evaluation's value, printed in the summary.
    assert metrics["test_error"] < 0.4, metrics["history"]
    assert metrics["dispatch_entropy"] == metrics["history"][-1]["dispatch_entropy"]
    assert f"{'dispatch_entropy':<20} {metrics['dispatch_entropy']:>10.4f}" in out


def test_single_model_on_cluster_data_has_no_routing_metrics(tmp_path, capsys):
    """A single model has no router: no dispatch entropy (it once crashed at evaluation)."""
    run = tmp_path / "run"
    metrics = train(CONFIGS / "synthetic" / "s1_single_cubic.yaml", tiny_synthetic(run, "train.epochs=2"))
    # The error is the trained model's: evaluating the run folder again gives it exactly. (A
    # single model stays near chance, 0.5 on these 2 balanced classes: 0.46 here, 0.34-0.49
    # over seeds 1-4, so the error itself is no learning check.)
    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["error"] == pytest.approx(metrics["test_error"], abs=1e-9)
    assert metrics["history"][-1]["test_error"] == metrics["test_error"]
    assert "dispatch_entropy" not in evaluated
    assert "dispatch_entropy" not in metrics and "mutual_information" not in metrics
    assert all("dispatch_entropy" not in h for h in metrics["history"])


def test_trainers_with_different_precisions_share_a_process(tmp_path):
    # accelerate's process-wide state would refuse the second precision (a study or a test
    # that builds a bf16 trainer after a float32 one).
    fp32 = train(SYNTHETIC_MOE, tiny_synthetic(tmp_path / "fp32", "train.epochs=2"))
    bf16 = train(SYNTHETIC_MOE, tiny_synthetic(tmp_path / "bf16", "train.epochs=2", "train.mixed_precision=bf16"))
    assert load_config(tmp_path / "bf16" / "config.yaml").train.mixed_precision == "bf16"
    assert len(fp32["history"]) == len(bf16["history"]) == 2
    for a, b in zip(fp32["history"], bf16["history"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.1 * a["train_loss"] + 0.02
