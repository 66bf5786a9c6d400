"""The sbatch scripts of slurm/ on a real SLURM started here (tests/slurm_cluster.py).

Opt-in (``pytest -m slurm``; about 3 minutes on 2 busy cores): a session fixture installs
slurm-wlm with apt-get when it is missing (root only; skipped with the reason otherwise) and
starts slurmctld with two slurmd "nodes" on this host. Every job trains on CPU with gloo
(``CPU=1``): the single-node script with 2 tasks, the multi-node script with one torchrun on
each of 2 nodes, the array script over a sweep, a job that is signalled mid-training
like a preempted one, requeues itself and resumes to the uninterrupted run's parameters, and
a job one of whose ranks is SIGKILLed, which fails within seconds.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import CONFIGS, tiny_synthetic
from moe_dist.train.checkpoint import load_checkpoint
from slurm_cluster import LocalSlurm, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

REPO = Path(__file__).resolve().parent.parent
SYNTHETIC_MOE = CONFIGS / "synthetic" / "s1_moe_nonlinear.yaml"
JOB_ENV = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO), "CPU": "1", "CONFIG": str(SYNTHETIC_MOE),
           "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1"}
STEPS_PER_EPOCH = 20


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    try:  # daemons that cannot start in this environment (CI containers): a skip with the reason
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2).start()
    except RuntimeError as exc:
        pytest.skip(f"the local SLURM cluster did not start here: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


def overrides(run_dir: Path, *extra: str) -> list[str]:
    """Seconds of training: 20 steps per epoch, 10 epochs, no early stopping."""
    return tiny_synthetic(run_dir, "train.batch_size=50", "train.epochs=10", "train.eval_every=5",
                          "train.early_stop_rise=0", "train.early_stop_loss=0", *extra)


def submit(slurm: LocalSlurm, script: str, out: Path, *args: str, options=(), **env: str) -> int:
    return slurm.sbatch(REPO / "slurm" / script, *args, cwd=REPO, env={**JOB_ENV, **env},
                        options=["--time=10", "--cpus-per-task=1", f"--output={out}", *options])


def finished_ok(slurm: LocalSlurm, job: int, log: Path, timeout: float = 400) -> list[dict]:
    infos = slurm.wait_finished(job, timeout)
    text = log.read_text() if log.exists() else "(no output)"
    for info in infos:
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    return infos


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints")["model"]


def assert_same_model(a: Path, b: Path) -> None:
    ma, mb = final_model(a), final_model(b)
    assert ma.keys() == mb.keys()
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name


@pytest.fixture(scope="session")
def two_rank_runs(slurm, tmp_path_factory):
    """The single-node script (2 tasks) and the multi-node script (2 nodes x 1 torchrun rank),
    same run, submitted together (they fit side by side: 2 + 1 + 1 CPUs of 4)."""
    d = tmp_path_factory.mktemp("two_rank")
    single = submit(slurm, "train.sbatch", d / "single.out", *overrides(d / "single"),
                    options=["--ntasks-per-node=2"])
    multi = submit(slurm, "train_multinode.sbatch", d / "multi.out", *overrides(d / "multi"),
                   options=["--nodes=2"], NPROC_PER_NODE="1")
    return {"dir": d, "single": (single, finished_ok(slurm, single, d / "single.out")),
            "multi": (multi, finished_ok(slurm, multi, d / "multi.out"))}


def test_single_node_script_trains_two_ranks(two_rank_runs):
    d = two_rank_runs["dir"]
    log = (d / "single.out").read_text()
    assert "2 ranks" in log and "test accuracy %" in log
    metrics = json.loads((d / "single" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["steps"] == 10 * STEPS_PER_EPOCH and len(metrics["history"]) == 10


def test_multinode_script_runs_one_torchrun_per_node(two_rank_runs, slurm):
    d = two_rank_runs["dir"]
    job, [info] = two_rank_runs["multi"]
    assert info["NumNodes"] == "2"
    log = (d / "multi.out").read_text()
    assert any(f"2 x 1 ranks, rendezvous {node}:" in log for node in slurm.nodes), log[-3000:]
    metrics = json.loads((d / "multi" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    # two ranks on two nodes train exactly like two ranks on one
    assert_same_model(d / "single", d / "multi")


def test_array_job_runs_the_sweep_members(slurm, tmp_path):
    root = tmp_path / "runs"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "root": str(root), "seeds": [0, 1],
        "overrides": overrides(tmp_path / "unused", "train.epochs=2")[1:],
        "members": [{"name": "moe", "config": str(SYNTHETIC_MOE)}]}))
    job = submit(slurm, "sweep_array.sbatch", tmp_path / "task-%a.out", options=["--array=0-1"],
                 SWEEP=str(sweep))
    infos = finished_ok(slurm, job, tmp_path / "task-0.out")
    assert sorted(i["ArrayTaskId"] for i in infos) == ["0", "1"]
    for seed in (0, 1):
        assert json.loads((root / "moe" / f"seed{seed}" / "metrics.json").read_text())["epochs_completed"] == 2
        assert f"[{seed}] moe/seed{seed} ... done" in (tmp_path / f"task-{seed}.out").read_text()
    a, b = (final_model(root / "moe" / f"seed{s}") for s in (0, 1))
    assert any(not torch.equal(a[k], b[k]) for k in a), "two seeds, two different runs"


PREEMPTIONS = {
    # what `--signal=B:USR1@120` delivers before the time limit: USR1 to the batch shell only
    "single-node": ("train.sbatch", ["--ntasks-per-node=2"], {}, "scancel"),
    "multi-node": ("train_multinode.sbatch", ["--nodes=2"], {"NPROC_PER_NODE": "1"}, "scancel"),
    # a job of the `high` partition needs the node: SLURM sends the job's --signal at once
    "partition-preemption": ("train.sbatch", ["--ntasks-per-node=2"], {}, "high-job"),
}


@pytest.mark.parametrize("case", PREEMPTIONS)
def test_signalled_job_requeues_and_resumes_to_the_uninterrupted_result(slurm, two_rank_runs, tmp_path, case):
    """USR1 reaches the batch shell; the script passes it to the launcher (srun, which hands it
    to every rank; or srun -> torchrun on each node -> its rank); the ranks agree on a step,
    checkpoint mid-epoch and exit 75; the script requeues the job; the requeued job runs the
    same command, resumes, and ends where the uninterrupted two-rank run ended."""
    script, options, env, how = PREEMPTIONS[case]
    run, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, script, log, *overrides(run), options=options, **env)
    pointer = run / "checkpoints" / "latest.json"
    slurm.wait(job, lambda infos: infos[0]["JobState"] not in ("PENDING", "RUNNING")
               or (pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 1), timeout=300, poll=0.02)
    assert slurm.job(job)["JobState"] == "RUNNING", log.read_text()[-3000:]
    if how == "scancel":
        slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    else:
        node = slurm.job(job)["NodeList"]
        slurm.run("sbatch", "-p", "high", "-w", node, "--ntasks=2", "--cpus-per-task=2", "--time=5",
                  f"--output={tmp_path / 'high.out'}", "--wrap", "sleep 1", cwd=tmp_path)
    slurm.wait(job, lambda infos: infos[0]["Restarts"] != "0", timeout=120)
    [info] = finished_ok(slurm, job, log)
    assert info["Restarts"] == "1"
    text = log.read_text()  # both runs (--open-mode=append)
    assert "SIGUSR1" in text and "preempted by SIGUSR1: stopped after step" in text, text[-4000:]
    assert "requeueing job" in text and "restart 1" in text
    if script == "train_multinode.sbatch":  # torchrun passed it on, rather than dying of it
        assert "closing signal SIGUSR1" in text and "User defined signal" not in text, text[-4000:]
    resumed = [line for line in text.splitlines() if line.startswith(f"resumed {run} after epoch")]
    assert resumed and ", batch " in resumed[0], text[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 10 * STEPS_PER_EPOCH
    assert_same_model(two_rank_runs["dir"] / "single", run)
    reference = json.loads((two_rank_runs["dir"] / "single" / "metrics.json").read_text())
    strip = lambda hist: [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in hist]  # noqa: E731
    assert strip(metrics["history"]) == strip(reference["history"])


def job_ranks(job: int) -> dict[int, psutil.Process]:
    """The training processes of ``job`` by SLURM_PROCID (its "nodes" are slurmd daemons on
    this host): python -m moe_dist.cli, not srun or the batch shell, whose command lines name it too."""
    ranks = {}
    for proc in psutil.process_iter():
        try:
            if proc.cmdline()[1:3] == ["-m", "moe_dist.cli"] and proc.environ().get("SLURM_JOB_ID") == str(job):
                ranks[int(proc.environ()["SLURM_PROCID"])] = proc
        except (psutil.Error, KeyError, ValueError):
            continue
    return ranks


def test_a_killed_rank_fails_the_job_within_seconds(slurm, tmp_path):
    """SIGKILL of one of the two tasks mid-epoch (tests/test_rank_failure.py does it under
    torchrun): the other fails its next collective, srun (--kill-on-bad-exit=1) ends the step,
    and the job has failed, with no rank left, well within a minute."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, "train.sbatch", log, *overrides(run), options=["--ntasks-per-node=2"])
    pointer = run / "checkpoints" / "latest.json"
    ranks = {}
    try:
        slurm.wait(job, lambda infos: infos[0]["JobState"] not in ("PENDING", "RUNNING")
                   or (pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 1), timeout=300, poll=0.02)
        ranks = job_ranks(job)
        assert sorted(ranks) == [0, 1], log.read_text()[-3000:]
        killed_at = time.time()
        ranks[0].send_signal(signal.SIGKILL)
        [info] = slurm.wait_finished(job, timeout=60)
        seconds = time.time() - killed_at
        _, alive = psutil.wait_procs(list(ranks.values()), timeout=max(60 - seconds, 1))
    finally:
        slurm.cancel(job)
        for proc in ranks.values():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log.read_text()[-3000:]
    assert seconds < 60 and not alive, (seconds, alive)
    assert not (run / "metrics.json").exists()
