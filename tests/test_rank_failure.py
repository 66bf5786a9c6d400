"""A rank that dies or hangs, in real processes: two CPU ranks (gloo, ep_size 2) under torchrun.

* SIGKILL of one rank mid-epoch: torchrun's agent stops the other and every process is gone
  within seconds, with a failing status; the same command then resumes from the last
  checkpoint and ends bit for bit where an uninterrupted run ends.
* SIGSTOP of one rank (a rank that hangs rather than dies): the other waits in a collective
  for ``parallel.timeout_s`` (here 15 s; the default is 600 s, torch's 30 min), then exits with
  one line naming the collective; torchrun SIGTERMs the stopped rank, which cannot act on it,
  and SIGKILLs it after its shutdown timeout (30 s; docs/launching.md, T7).

Every test kills what it started in a ``finally`` (SIGCONT, then SIGKILL), so that a failure
leaves no stopped rank behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing as mp

from moe_dist.cli import main
from moe_dist.config import RESUMABLE_CHANGES, check_resumable, load_config
from moe_dist.errors import ConfigError
from moe_dist.parallel import collective_failure
from procs import free_port
from test_preemption import ENV, SYNTHETIC_MOE, assert_same_final_state
from test_preemption import overrides as preemption_overrides

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 4  # 0.3-1 s each: the run is still going well after its first checkpoint
# The longest wait of one rank for the other in this run is short: with parallel.timeout_s=3
# three whole runs passed at a load average of 6 on 2 cores. 15 s leaves a wide margin.
TIMEOUT_S = 15
# A collective named with the code that called it, e.g. "all_reduce in PreemptionFlag.agreed,
# moe_dist/train/preemption.py:108".
NAMED_COLLECTIVE = r"a collective \(\w+ in [\w.]+, moe_dist/[\w/]+\.py:\d+\)"


def overrides(run_dir: Path, *extra: str) -> list[str]:
    """20 steps per epoch (global batch 50 of 1,000), no early stopping, experts sharded."""
    return preemption_overrides(run_dir, "parallel.ep_size=2", f"train.epochs={EPOCHS}", *extra)


def torchrun(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "moe_dist.cli", "train", "--config", str(SYNTHETIC_MOE), *overrides(run_dir, *extra)]


def running(proc: psutil.Process) -> bool:
    """Not exited (a zombie has: only its parent has not reaped it yet)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Launch:
    """torchrun and its two ranks, output to a file; :meth:`kill_all` leaves nothing behind."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:  # a file, not a pipe: nobody has to read while we wait
            self.torchrun = subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True, cwd=REPO)
        self.ranks: dict[int, psutil.Process] = {}

    @property
    def output(self) -> str:
        return self.log.read_text()

    def find_ranks(self) -> dict[int, psutil.Process]:
        """The rank processes (torchrun starts each in a session of its own), by RANK."""
        for child in psutil.Process(self.torchrun.pid).children(recursive=True):
            rank = child.environ().get("RANK")
            if rank is not None and "moe_dist.cli" in child.cmdline():
                self.ranks[int(rank)] = child
        assert sorted(self.ranks) == [0, 1], self.ranks
        return self.ranks

    def alive(self) -> list[str]:
        """Every process of the launch still running."""
        procs = [("torchrun", psutil.Process(self.torchrun.pid))] if self.torchrun.poll() is None else []
        return [name for name, proc in procs + [(f"rank {r}", p) for r, p in self.ranks.items()] if running(proc)]

    def wait_rank_gone(self, rank: int, since: float, within: float) -> float:
        """Seconds from ``since`` until ``rank`` has exited; fails after ``within``."""
        while time.time() < since + within:
            if not running(self.ranks[rank]):
                return time.time() - since
            time.sleep(0.05)
        pytest.fail(f"rank {rank} still running {within:.0f} s later\n{self.output[-3000:]}")

    def wait_all_gone(self, since: float, within: float) -> float:
        """Seconds from ``since`` until torchrun and both ranks have exited; fails after ``within``."""
        while time.time() < since + within:
            if self.torchrun.poll() is not None and not self.alive():
                return time.time() - since
            time.sleep(0.05)
        pytest.fail(f"still running {within:.0f} s after the rank failed: {self.alive()}\n{self.output[-3000:]}")

    def kill_all(self) -> None:
        for proc in self.ranks.values():
            for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped process dies of SIGKILL too; SIGCONT for safety
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
        if self.torchrun.poll() is None:
            os.killpg(self.torchrun.pid, signal.SIGKILL)
        self.torchrun.wait()


def wait_for_checkpoint(launch: Launch, run_dir: Path, timeout: float = 120) -> None:
    """Until the run has checkpointed its first epoch (training is then under way)."""
    pointer = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + timeout
    while time.time() < deadline and launch.torchrun.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 1:
            return
        time.sleep(0.01)
    pytest.fail(f"no epoch-1 checkpoint while training:\n{launch.output[-3000:]}")


def run_to_end(cmd: list[str], log: Path, timeout: float = 180) -> str:
    launch = Launch(cmd, log)
    try:
        assert launch.torchrun.wait(timeout) == 0, launch.output[-3000:]
        return launch.output
    finally:
        launch.kill_all()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Rank 0 (the one that writes checkpoints) SIGKILLed shortly after the first checkpoint,
    i.e. early in epoch 2: the exit statuses and the seconds until every process was gone."""
    d = tmp_path_factory.mktemp("killed")
    run_dir = d / "run"
    launch = Launch(torchrun(run_dir), d / "killed.log")
    try:
        wait_for_checkpoint(launch, run_dir)
        ranks = launch.find_ranks()
        time.sleep(0.2)  # into epoch 2's steps
        killed_at = time.time()
        ranks[0].send_signal(signal.SIGKILL)
        seconds = launch.wait_all_gone(killed_at, within=60)
        return {"dir": d, "run": run_dir, "seconds": seconds, "code": launch.torchrun.returncode,
                "output": launch.output}
    finally:
        launch.kill_all()


@pytest.mark.multiprocess
def test_a_killed_rank_ends_every_process_with_a_failing_status(killed_run):
    assert killed_run["seconds"] < 60 and killed_run["code"] != 0, killed_run["output"][-3000:]
    out = killed_run["output"]
    assert "exitcode  : -9" in out, out[-3000:]  # torchrun names the killed rank
    assert not (killed_run["run"] / "metrics.json").exists()  # it stopped mid-run
    # the survivor's one line (torchrun's SIGTERM only sets its preemption flag: the next
    # collective finds the connection closed)
    assert re.search(rf"moe-dist: error: rank 1: {NAMED_COLLECTIVE} lost its connection to another rank", out), \
        out[-3000:]


@pytest.mark.slow  # two more two-rank runs: about 25 s on 2 busy cores
@pytest.mark.multiprocess
def test_the_same_command_resumes_a_killed_run_to_the_uninterrupted_result(killed_run):
    run_dir, d = killed_run["run"], killed_run["dir"]
    epoch = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["epoch"]
    assert 1 <= epoch < EPOCHS
    out = run_to_end(torchrun(run_dir), d / "resumed.log")
    assert f"resumed {run_dir} after epoch {epoch}" in out, out[-3000:]
    run_to_end(torchrun(d / "straight"), d / "straight.log")
    assert_same_final_state(d / "straight", run_dir)


@pytest.mark.slow  # the timeout, then torchrun's 30 s before it SIGKILLs the stopped rank: about 60 s
@pytest.mark.multiprocess
def test_a_hung_rank_makes_the_other_exit_after_the_timeout_naming_the_collective(tmp_path):
    run_dir = tmp_path / "run"
    launch = Launch(torchrun(run_dir, f"parallel.timeout_s={TIMEOUT_S}"), tmp_path / "stopped.log")
    try:
        wait_for_checkpoint(launch, run_dir)
        ranks = launch.find_ranks()
        time.sleep(0.2)
        stopped_at = time.time()
        ranks[1].send_signal(signal.SIGSTOP)
        rank0_seconds = launch.wait_rank_gone(0, stopped_at, within=TIMEOUT_S + 20)
        seconds = launch.wait_all_gone(stopped_at, within=90)
    finally:
        launch.kill_all()
    out = launch.output
    assert launch.torchrun.returncode != 0, out[-3000:]
    line = re.search(rf"moe-dist: error: rank 0: {NAMED_COLLECTIVE} waited longer than "
                     rf"parallel.timeout_s={TIMEOUT_S} s for the other ranks: one of them died or hangs\n", out)
    assert line, out[-3000:]
    # rank 0 gave up after the timeout, not before, and did not hang on its way out
    assert TIMEOUT_S <= rank0_seconds < TIMEOUT_S + 20, rank0_seconds
    assert "Traceback" not in out.split("moe-dist: error:")[0], "rank 0 printed one line, no traceback"


# ------------------------------------------------------------------------- parallel.timeout_s

def _wait_in_a_subgroup(rank: int, port: int, out: str) -> None:
    """Rank 0 waits in an all-reduce of group [0, 1] that rank 1 never joins (it hangs, as far
    as rank 0 can tell); the others wait for rank 0's result, then all leave."""
    import torch.distributed as dist

    from moe_dist.parallel import destroy_distributed, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="3",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="3", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_s=2)
    pair = dist.new_group([0, 1])  # as moe_dist.parallel.groups makes them: no timeout given
    dist.barrier()
    result = Path(out, "rank0.json")
    if rank == 0:
        start = time.time()
        try:
            dist.all_reduce(torch.ones(1), group=pair)
            outcome = {"seconds": time.time() - start, "error": None}
        except RuntimeError as exc:
            error = collective_failure(exc)
            outcome = {"seconds": time.time() - start, "error": str(error) if error else repr(exc)}
        result.write_text(json.dumps(outcome))
    deadline = time.time() + 60
    while not result.exists() and time.time() < deadline:  # no collective: rank 0 may be in one
        time.sleep(0.05)
    destroy_distributed()


@pytest.mark.multiprocess
def test_groups_made_after_joining_time_out_after_parallel_timeout_s(tmp_path):
    """``dist.new_group`` takes torch's 30 min, not the default group's timeout, unless
    moe_dist.parallel.env sets torch's default too (docs/launching.md, T7): the expert-parallel
    all-to-alls run in such groups."""
    mp.start_processes(_wait_in_a_subgroup, args=(free_port(), str(tmp_path)), nprocs=3, start_method="spawn")
    waited = json.loads((tmp_path / "rank0.json").read_text())
    assert waited["seconds"] < 10, waited  # torch's default would be 30 min
    assert re.fullmatch(r"rank 0: a collective \(all_reduce in _wait_in_a_subgroup, tests/test_rank_failure.py:\d+\) "
                        r"waited longer than parallel.timeout_s=2 s for the other ranks: one of them died or hangs",
                        waited["error"]), waited
    assert torch.distributed.distributed_c10d.default_pg_timeout.total_seconds() == 1800  # this process: torch's



def test_timeout_defaults_to_ten_minutes_must_be_positive_and_may_change_on_resumption():
    assert load_config(None).parallel.timeout_s == 600
    assert load_config(None, ["parallel.timeout_s=30"]).parallel.timeout_s == 30
    with pytest.raises(ConfigError, match=r"parallel.timeout_s=0.0 must be > 0"):
        load_config(None, ["parallel.timeout_s=0"])
    assert "parallel.timeout_s" in RESUMABLE_CHANGES
    check_resumable(load_config(None), load_config(None, ["parallel.timeout_s=60"]), "runs/x")


def test_only_errors_of_collectives_become_collective_errors(monkeypatch, tmp_path):
    """A RuntimeError that no torch.distributed function raised stays what it is, in the
    trainer and in the command line."""
    assert collective_failure(RuntimeError("Timed out waiting 30000ms for recv operation to complete")) is None
    assert collective_failure(ValueError("timed out")) is None

    def build_trainer(cfg):
        raise RuntimeError("Timed out waiting for the kettle")

    monkeypatch.setattr("moe_dist.train.build.build_trainer", build_trainer)
    with pytest.raises(RuntimeError, match="kettle"):
        main(["train", f"run_dir={tmp_path}"])
