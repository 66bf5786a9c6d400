"""Sweeps, studies and distillation on several processes (expert parallelism): `moe-dist sweep
--nproc 2 parallel.ep_size=2` and `torchrun --nproc_per_node 2 -m moe_dist.cli study ...` in
real gloo processes give the single-process results (MNIST architecture: no BatchNorm, so the
ranks are exactly equivalent; test errors equal, losses to float rounding)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, REPO
from moe_dist.cli import main
from moe_dist.config import load_config
from moe_dist.errors import ConfigError
from moe_dist.experiments import study
from moe_dist.experiments.pretrained import STAGES, run_pretrained_gate_study
from moe_dist.experiments.study import REGULARIZERS, experts_run_dir
from moe_dist.launch import TORCHRUN_SIGNALS
from moe_dist.train.build import build_trainer

LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Whole procedures train for epochs on 2 ranks, whose gradient sums round in another order
# than one process's; Adam turns that rounding into small parameter differences which the
# following steps carry. 1e-4 relative is the bound for a two-process training
# history; a wrong layout or a missed reduction moves these losses by 1e-2 or more. (The
# pretrained-gate study's final loss matched within 1e-5 on one CPU model, to 1.1e-5 on an
# AVX-512/AMX Xeon.)
LOSS_TOL = {"rel": 1e-4, "abs": 1e-7}


@pytest.fixture(autouse=True)
def _launch_env(monkeypatch):
    """The sweep's jobs inherit this process's environment: this checkout's moe_dist, one
    thread per rank, gloo on the loopback interface."""
    for key, value in LAUNCH_ENV.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def torchrun(args: list[str], timeout: float = 300) -> str:
    proc = subprocess.Popen([*TORCHRUN, *args], env={**os.environ, **LAUNCH_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    return out


def mnist(data_root: str, *extra: str) -> list[str]:
    """Seconds-long runs: 512 samples in global batches of 100 (the last, 12, and the
    evaluation batches split unevenly over two ranks)."""
    return ["data.name=mnist10k", f"data.root={data_root}", "data.train_size=512", "data.test_size=256",
            "train.batch_size=100", "train.eval_batch_size=200", "train.epochs=2",
            "train.lr=3e-3", "train.progress=false", "train.num_threads=1", *extra]


def assert_same_results(ours: dict, ref: dict) -> None:
    """Counts (errors, expert selections) equal; losses and entropies to float rounding."""
    for key in ("test_error", "train_error", "selection_table", "samples_per_expert", "steps"):
        assert ours[key] == ref[key], key
    for key in ("test_loss", "train_loss", "mutual_information", "usage_entropy", "sample_entropy"):
        assert ours[key] == pytest.approx(ref[key], **LOSS_TOL), key
    assert len(ours["history"]) == len(ref["history"])
    for a, b in zip(ours["history"], ref["history"]):
        assert (a["train_error"], a["test_error"]) == (b["train_error"], b["test_error"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], **LOSS_TOL)


# ------------------------------------------------------------------------------------ sweep

@pytest.mark.slow  # four torchrun launches and two single-process jobs: about 45 s on 2 busy cores
@pytest.mark.multiprocess
def test_sweep_nproc2_ep2_equals_one_process_distill_member_included(tmp_path, data_root, capsys):
    """The file asks for 2 processes per job; `--nproc 1` (the command line wins) is the reference."""
    def sweep(root: Path, *args: str) -> int:
        sweep_file = tmp_path / f"{root.name}.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "root": str(root), "nproc": 2, "overrides": mnist(data_root, "moe.num_experts=4", "parallel.ep_size=2"),
            "members": [{"name": "attentive", "config": str(CONFIGS / "mnist" / "attentive_lcv.yaml")},
                        {"name": "distilled", "config": str(CONFIGS / "mnist" / "distilled_lcv.yaml"),
                         "distill": "attentive"}]}))
        return main(["sweep", str(sweep_file), *args])

    assert sweep(tmp_path / "two", "--dry-run") == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and all(c.startswith(" ".join(TORCHRUN)) for c in commands)
    assert f"--signals-to-handle={TORCHRUN_SIGNALS} -m moe_dist.cli train" in commands[0]
    assert "SIGUSR1" in TORCHRUN_SIGNALS and "-m moe_dist.cli distill" in commands[1]

    assert sweep(tmp_path / "one", "--nproc", "1") == 0
    assert sweep(tmp_path / "two") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" ... ")[1].split()[0] for line in out[:2] + out[3:5]] == ["done"] * 4, out
    for member in ("attentive", "distilled"):
        ref, ours = (json.loads((tmp_path / n / member / "seed0" / "metrics.json").read_text()) for n in ("one", "two"))
        assert (ref["num_processes"], ref["ep_size"]) == (1, 1)
        assert (ours["num_processes"], ours["ep_size"]) == (2, 2), member
        assert_same_results(ours, ref)
    ref, ours = (json.loads((tmp_path / n / "distilled" / "seed0" / "metrics.json").read_text()) for n in ("one", "two"))
    assert ours["experts_unchanged"] is True and ref["experts_unchanged"] is True
    for k in ("top1", "top2"):  # conditional top-k evaluation: routed pairs summed over the ranks
        for key in ("test_error", "expert_flops_fraction", "routed_pairs_per_expert"):
            assert ours["conditional"][k][key] == ref["conditional"][k][key], (k, key)
        assert ours["conditional"][k]["mutual_information"] == pytest.approx(
            ref["conditional"][k]["mutual_information"], **LOSS_TOL)
    assert ours["conditional"]["top1"]["expert_flops_fraction"] == 0.25

    # A layout that cannot work fails the job with the trainer's one-line error.
    assert sweep(tmp_path / "two", "--seeds", "1", "--index", "0", "parallel.ep_size=4") == 1
    status = capsys.readouterr().out.splitlines()[0]
    assert status.startswith("[0] attentive/seed1 ... failed (exit 1)")
    assert "moe-dist: error: parallel.ep_size=4 does not divide the world size 2" in status
    assert "Traceback" not in status


@pytest.mark.slow  # a 2-rank run interrupted and resumed: about 40 s
@pytest.mark.multiprocess
def test_sweep_nproc2_passes_sigusr1_through_torchrun_to_the_ranks(tmp_path):
    """torchrun dies of SIGUSR1 unless told to handle it: here it passes the signal to both
    ranks, they checkpoint mid-epoch and exit 75, the sweep reports the job preempted and
    exits 75; run again, it resumes to the single-process result."""
    from test_preemption import SYNTHETIC_MOE, overrides, preempt_and_resume_sweep

    run_dir, _ = preempt_and_resume_sweep(tmp_path, "--nproc", "2", "parallel.ep_size=2")
    log = (run_dir / "sweep.log").read_text()
    assert log.count("moe-dist: preempted by SIGUSR1: stopped after step") == 2, log[-3000:]  # both ranks
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert (resumed["num_processes"], resumed["ep_size"]) == (2, 2)
    straight = build_trainer(load_config(SYNTHETIC_MOE, overrides(tmp_path / "straight", "seed=0"))).fit()
    assert resumed["test_error"] == straight["test_error"]
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        assert a["train_error"] == b["train_error"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], **LOSS_TOL)


# ------------------------------------------------------------------------------------ studies

@pytest.mark.multiprocess
def test_experts_study_under_torchrun_writes_the_single_process_table(tmp_path, data_root):
    """Reference: the study's runs trained in this process, then `study experts` writes the
    table; under torchrun every rank trains each run in-process and rank 0 writes it."""
    config = CONFIGS / "mnist" / "vanilla.yaml"
    overrides = mnist(data_root, "parallel.ep_size=2")
    one, two = tmp_path / "one", tmp_path / "two"
    for regularizer in ("lcv", "ls"):
        for E in (2, 4):
            build_trainer(load_config(config, [*overrides, *REGULARIZERS["mnist"][regularizer], f"moe.num_experts={E}", "seed=0",
                                         f"name=study_experts/{regularizer}_e{E}",
                                         f"run_dir={experts_run_dir(one, regularizer, E, 0)}"])).fit()
    study_args = ["study", "experts", "--config", str(config), "--experts", "2,4", *overrides]
    assert main([*study_args, "--root", str(one)]) == 0
    out = torchrun(["-m", "moe_dist.cli", *study_args, "--root", str(two)])
    assert out.count("# Expert-count study") == 1, "rank 0 alone prints the table"

    tables = [list(csv.DictReader((root / "study.csv").open())) for root in (one, two)]
    assert len(tables[1]) == 4
    for ours, ref in zip(tables[1], tables[0], strict=True):
        for key in ("E", "regularizer", "seeds", "experts_used_mean", "test_error_mean"):
            assert ours[key] == ref[key], key
        assert float(ours["usage_entropy_mean"]) == pytest.approx(float(ref["usage_entropy_mean"]), **LOSS_TOL)
    for regularizer in ("lcv", "ls"):
        for E in (2, 4):
            metrics = json.loads((experts_run_dir(two, regularizer, E, 0) / "metrics.json").read_text())
            assert (metrics["num_processes"], metrics["ep_size"]) == (2, 2)
    assert (two / "study_usage.png").read_bytes().startswith(b"\x89PNG")
    assert (two / "study.md").read_text().count("\n| ") == 5


def test_experts_study_nproc_starts_each_run_under_torchrun(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(study.subprocess, "run",
                        lambda cmd, check: commands.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    study.train_process("c.yaml", ["parallel.ep_size=2"], nproc=2)
    study.train_process("c.yaml", [])
    assert commands[0] == [*TORCHRUN, f"--signals-to-handle={TORCHRUN_SIGNALS}", "-m", "moe_dist.cli",
                           "train", "--config", "c.yaml", "parallel.ep_size=2"]
    assert commands[1] == [sys.executable, "-m", "moe_dist.cli", "train", "--config", "c.yaml"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--nproc 2: .* left out under a launcher"):
        study.run_experts_study(CONFIGS / "mnist" / "vanilla.yaml", [2], root=tmp_path, nproc=2)
    assert not commands[2:] and not list(tmp_path.iterdir())


PRETRAINED_SCRIPT = """\
import sys
from moe_dist.experiments.pretrained import run_pretrained_gate_study
run_pretrained_gate_study("mnist10k", {0: [[0, 1], [2, 3]]}, [0], sys.argv[1], sys.argv[2:])
"""


@pytest.mark.multiprocess
def test_pretrained_gate_study_under_torchrun_equals_one_process(tmp_path, data_root):
    """Every stage of docs/papers.md A.6 on two ranks with the two experts sharded (ep_size 2):
    the start-weight checks gather the experts, rank 0 writes the assembled checkpoints."""
    overrides = [f"data.root={data_root}", "data.train_size=600", "data.test_size=300", "data.classes=[0,1,2,3]",
                 "moe.num_experts=2", "train.epochs=2", "train.batch_size=50", "train.lr=1e-2",
                 "train.progress=false", "train.num_threads=1", "train.eval_every=100", "parallel.ep_size=2"]
    rows = run_pretrained_gate_study("mnist10k", {0: [[0, 1], [2, 3]]}, [0], tmp_path / "one", overrides)
    script = tmp_path / "pretrained_study.py"
    script.write_text(PRETRAINED_SCRIPT)
    torchrun([str(script), str(tmp_path / "two"), *overrides])

    table = list(csv.DictReader((tmp_path / "two" / "mnist10k" / "summary.csv").open()))
    assert [r["stage"] for r in table] == list(STAGES)
    for ours, ref in zip(table, rows, strict=True):
        assert float(ours["test_error"]) == ref["test_error"], ours["stage"]
        for key in ("final_train_loss", "mutual_information", "usage_entropy"):
            assert float(ours[key]) == pytest.approx(ref[key], **LOSS_TOL), (ours["stage"], key)
    for stage in STAGES:
        folder = "seed0" if stage.startswith("scratch") else "split0_seed0"
        metrics = json.loads((tmp_path / "two" / "mnist10k" / folder / stage / "metrics.json").read_text())
        assert (metrics["num_processes"], metrics["ep_size"]) == (2, 2), stage
