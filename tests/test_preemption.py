"""Preemption without SLURM: SIGUSR1 mid-epoch in real processes -> a checkpoint at that step
-> the same command again resumes and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, tiny_synthetic
from procs import free_port
from moe_dist.config import load_config
from moe_dist.train.checkpoint import load_checkpoint
from moe_dist.train.preemption import PREEMPTED_EXIT_CODE, PreemptionFlag, SignalForwarder
from moe_dist.train.build import build_trainer

REPO = Path(__file__).resolve().parent.parent
SYNTHETIC_MOE = CONFIGS / "synthetic" / "s1_moe_nonlinear.yaml"
ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def overrides(run_dir: Path, *extra: str) -> list[str]:
    """20 steps per epoch (global batch 50 of 1,000), no early stopping, and enough epochs
    (seconds of training) that the signal sent after epoch 1 lands mid-epoch, long before
    the run would end."""
    return tiny_synthetic(run_dir, "train.batch_size=50", "train.epochs=20", "train.eval_every=5",
                          "train.early_stop_rise=0", "train.early_stop_loss=0", *extra)


def train_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "moe_dist.cli", "train", "--config", str(SYNTHETIC_MOE), *args]


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**os.environ, **ENV, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str]]:
    deadline = time.time() + timeout
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(deadline - time.time(), 1))
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        pytest.fail("a training process did not finish in time")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return results


def wait_for_epoch(run_dir: Path, procs: list[subprocess.Popen], epoch: int = 1, timeout: float = 120) -> None:
    """Until the run has checkpointed ``epoch`` epochs (training is then under way)."""
    pointer = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if pointer.exists() and json.loads(pointer.read_text())["epoch"] >= epoch:
            return
        time.sleep(0.01)
    outputs = finish(procs, timeout=5)
    pytest.fail(f"no epoch-{epoch} checkpoint while training: {[o[-2000:] for _, o in outputs]}")


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What srun gives each task (moe_dist.parallel.env reads SLURM_* like RANK/WORLD_SIZE)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def assert_same_final_state(a_dir: Path, b_dir: Path) -> None:
    a, b = load_checkpoint(a_dir / "checkpoints"), load_checkpoint(b_dir / "checkpoints")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a_dir, b_dir))
    strip = lambda hist: [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in hist]  # noqa: E731
    assert strip(ma["history"]) == strip(mb["history"])
    assert (ma["steps"], ma["test_error"]) == (mb["steps"], mb["test_error"])


def assert_preempted_mid_epoch(run_dir: Path, steps_per_epoch: int = 20) -> dict:
    pointer = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert "_step_" in pointer["file"], pointer
    state = json.loads(load_checkpoint(run_dir / "checkpoints")["state"])
    assert 0 < state["batch"] <= steps_per_epoch, state
    assert state["step"] == state["epoch"] * steps_per_epoch + state["batch"] == pointer["step"]
    assert state["partial"]["num_batches"] == state["batch"]
    assert not (run_dir / "metrics.json").exists()
    return state


def test_sigusr1_mid_epoch_checkpoints_and_the_same_command_resumes_exactly(tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    cmd = train_command(overrides(preempted))
    proc = start(cmd)
    wait_for_epoch(preempted, [proc])
    proc.send_signal(signal.SIGUSR1)
    [(code, out)] = finish([proc])
    assert code == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "preempted by SIGUSR1: stopped after step" in out
    state = assert_preempted_mid_epoch(preempted)
    assert state["epoch"] < 20

    [(code, out)] = finish([start(cmd)])  # the same command, no flags
    assert code == 0, out[-3000:]
    assert (f"resumed {preempted} after epoch {state['epoch']}, batch {state['batch']} "
            f"of epoch {state['epoch'] + 1}") in out
    build_trainer(load_config(SYNTHETIC_MOE, overrides(straight))).fit()
    assert_same_final_state(straight, preempted)


@pytest.mark.slow  # three two-process launches: about 40 s on 2 busy cores
@pytest.mark.multiprocess
def test_two_ranks_stop_at_the_same_step_when_one_gets_the_signal(tmp_path):
    """Two gloo processes with expert parallelism (ep_size 2); SIGUSR1 reaches rank 1 only:
    the ranks agree, rank 0 writes the checkpoint, both exit 75; the same two commands
    resume and end with the uninterrupted two-rank run's parameters and history."""
    def launch(run_dir: Path) -> list[subprocess.Popen]:
        cmd, port = train_command(overrides(run_dir, "parallel.ep_size=2", "train.epochs=8")), free_port()
        return [start(cmd, **rank_env(rank, 2, port)) for rank in (0, 1)]

    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    for code, out in finish(launch(straight)):
        assert code == 0, out[-3000:]
    procs = launch(preempted)
    wait_for_epoch(preempted, procs)
    procs[1].send_signal(signal.SIGUSR1)
    for code, out in finish(procs):
        assert code == PREEMPTED_EXIT_CODE, out[-3000:]
    assert_preempted_mid_epoch(preempted)
    for code, out in finish(launch(preempted)):
        assert code == 0, out[-3000:]
    assert_same_final_state(straight, preempted)


def preempt_and_resume_sweep(tmp_path: Path, *args: str) -> tuple[Path, str]:
    """A one-job sweep (`moe-dist sweep FILE --index 0 ARGS`, what a SLURM array task runs)
    signalled with SIGUSR1 mid-training must report the job preempted, exit 75 and leave a
    mid-epoch checkpoint; run again, it resumes the job to its end. Returns the run folder
    and the first sweep's output."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"root": str(tmp_path / "runs"), "members": [
        {"name": "moe", "config": str(SYNTHETIC_MOE), "overrides": overrides(tmp_path / "unused")[1:]}]}))
    cmd = [sys.executable, "-m", "moe_dist.cli", "sweep", str(sweep), "--index", "0", *args]
    run_dir = tmp_path / "runs" / "moe" / "seed0"
    proc = start(cmd)
    wait_for_epoch(run_dir, [proc])
    proc.send_signal(signal.SIGUSR1)
    [(code, first)] = finish([proc])
    assert code == PREEMPTED_EXIT_CODE, first
    assert "[0] moe/seed0 ... preempted" in first
    assert_preempted_mid_epoch(run_dir)
    [(code, out)] = finish([start(cmd)])
    assert code == 0 and "done (resumed)" in out, out
    return run_dir, first


@pytest.mark.slow  # about 20 s
def test_sweep_passes_the_signal_to_its_job_and_exits_preempted(tmp_path):
    """The sweep forwards SIGUSR1 to its training process; resumed, the job ends bit for bit
    where an uninterrupted run ends."""
    run_dir, _ = preempt_and_resume_sweep(tmp_path)
    straight = tmp_path / "straight"
    build_trainer(load_config(SYNTHETIC_MOE, overrides(straight, "seed=0"))).fit()
    assert_same_final_state(straight, run_dir)


def test_flag_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionFlag() as flag:
        assert flag.agreed(False, torch.device("cpu")) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.agreed(False, torch.device("cpu")) == signal.SIGTERM
    assert signal.getsignal(signal.SIGUSR1) is before


def test_forwarder_passes_signals_to_the_child():
    child = ("import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75)); "
             "print('ready', flush=True); time.sleep(60)")

    def signal_parent_when_child_ready():
        while forwarder.child is None:
            time.sleep(0.01)
        forwarder.child.stdout.readline()
        os.kill(os.getpid(), signal.SIGUSR1)

    with SignalForwarder() as forwarder:
        sender = threading.Thread(target=signal_parent_when_child_ready)
        sender.start()
        code = forwarder.call([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        sender.join()
    assert code == PREEMPTED_EXIT_CODE and forwarder.signum == signal.SIGUSR1
