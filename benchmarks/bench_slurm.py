"""Benchmark the SLURM scripts on a real local SLURM: time from ``sbatch`` to the first
training step, and from the preemption signal to the requeued job's first step.

The cluster is the one the tests start (``tests/slurm_cluster.py``: slurmctld and two
slurmd "nodes" on this host, ``AuthInfo=cred_expire=5``, ``bf_interval=1,sched_interval=2``).
Each job is ``slurm/train.sbatch`` with 2 tasks on one node, CPU/gloo, the synthetic s1 MoE
(1,000 samples, 20 steps per epoch, 10 epochs). The ranks run under a probe (``PYTHON``
points at a wrapper) that appends wall-clock times to a file: process start, end of the
first training step, exit. Reported per job, in seconds:

* ``submit -> first step``: from ``sbatch`` until both ranks have computed their first step's loss,
  split into submit -> rank processes started (scheduling, job and step launch) and
  processes started -> first step (Python and torch imports, data, model, rendezvous).
* ``signal -> requeued first step``: after epoch 1, ``scancel --signal=USR1 --batch`` (what
  ``--signal=B:USR1@120`` delivers) at t = 0; split into -> ranks exited with the checkpoint,
  -> requeued ranks started (SLURM's requeue delay, cred_expire + 1 s, plus a scheduler
  pass), -> first step of the resumed run.
* ``preemption -> requeued first step`` (``--partition-preemption``): a 2-CPU job of the
  ``high`` partition is submitted for the node at t = 0 (it runs ``sleep 1``); SLURM sends
  the training job its signal at once; the rest as above (includes the high job's run).

Run as root: ``python benchmarks/bench_slurm.py [--repeats 3] [--partition-preemption] [--json FILE]``
(installs slurm-wlm with apt-get when missing; about 30 s per job on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from slurm_cluster import LocalSlurm, unavailable  # noqa: E402

PROBE = '''\
import json, os, sys, time
started = time.time()
def record(event, when=None, **fields):
    line = {"event": event, "time": when or time.time(), "rank": int(os.environ.get("SLURM_PROCID", 0)),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0), **fields}
    with open(os.environ["MOE_DIST_PROBE"], "a") as f:
        f.write(json.dumps(line) + "\\n")
record("start", started)
from moe_dist.train.trainer import Trainer
forward = Trainer.forward_loss  # the loop's first call of every training step
def first_step(self, *args, **kwargs):
    result = forward(self, *args, **kwargs)
    if not getattr(self, "_probed", False):
        self._probed = True
        record("first_step")
    return result
Trainer.forward_loss = first_step
from moe_dist.cli import main
code = main(sys.argv[3:])  # argv: probe.py -m moe_dist.cli train ...
record("exit", code=code)
sys.exit(code)
'''
OVERRIDES = ["data.train_size=1000", "data.test_size=500", "train.batch_size=50", "train.epochs=10",
             "train.eval_every=5", "train.early_stop_rise=0", "train.early_stop_loss=0", "train.progress=false",
             "train.num_threads=1"]


def events(probe: Path) -> list[dict]:
    return [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []


def when(probe: Path, event: str, restart: int, last: bool = True) -> float:
    times = [e["time"] for e in events(probe) if e["event"] == event and e["restart"] == restart]
    if len(times) != 2:
        raise RuntimeError(f"{probe}: expected 2 ranks' {event!r} in run {restart}, got {len(times)}")
    return max(times) if last else min(times)


def run_job(cluster: LocalSlurm, work: Path, name: str, env: dict, preempt: str) -> dict[str, float]:
    run, probe, log = work / name, work / f"{name}.probe", work / f"{name}.out"
    submitted = time.time()
    job = cluster.sbatch(REPO / "slurm" / "train.sbatch", f"run_dir={run}", *OVERRIDES, cwd=REPO,
                         env={**env, "MOE_DIST_PROBE": str(probe)},
                         options=["--ntasks-per-node=2", "--cpus-per-task=1", "--time=10", f"--output={log}"])
    pointer = run / "checkpoints" / "latest.json"
    cluster.wait(job, lambda i: i[0]["JobState"] not in ("PENDING", "RUNNING")
                 or (pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 1), 300, poll=0.02)
    signalled = time.time()
    if preempt == "signal":
        cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    else:
        cluster.run("sbatch", "-p", "high", "-w", cluster.job(job)["NodeList"], "--ntasks=2", "--cpus-per-task=2",
                    "--time=5", f"--output={work / (name + '.high.out')}", "--wrap", "sleep 1", cwd=work)
    infos = cluster.wait_finished(job, 400)
    if infos[0]["JobState"] != "COMPLETED" or infos[0]["Restarts"] != "1":
        raise RuntimeError(f"job {job}: {infos[0]['JobState']}, {infos[0]['Restarts']} restarts; see {log}")
    return {
        "submit -> ranks started": when(probe, "start", 0, last=False) - submitted,
        "ranks started -> first step": when(probe, "first_step", 0) - when(probe, "start", 0, last=False),
        "submit -> first step": when(probe, "first_step", 0) - submitted,
        "signal -> ranks exited (checkpoint)": when(probe, "exit", 0) - signalled,
        "ranks exited -> requeued ranks started": when(probe, "start", 1, last=False) - when(probe, "exit", 0),
        "requeued ranks started -> first step": when(probe, "first_step", 1) - when(probe, "start", 1, last=False),
        "signal -> requeued first step": when(probe, "first_step", 1) - signalled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="jobs signalled with scancel (default 3)")
    parser.add_argument("--partition-preemption", type=int, default=1, metavar="N",
                        help="jobs preempted by a high-partition job (default 1)")
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        sys.exit(f"bench_slurm: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench_slurm_") as tmp:
        work = Path(tmp)
        probe_py = work / "probe.py"
        probe_py.write_text(PROBE)
        wrapper = work / "python"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {probe_py} "$@"\n')
        wrapper.chmod(0o755)
        env = {"PYTHON": str(wrapper), "PYTHONPATH": str(REPO), "CPU": "1", "GLOO_SOCKET_IFNAME": "lo",
               "CONFIG": str(REPO / "configs" / "synthetic" / "s1_moe_nonlinear.yaml"), "TQDM_DISABLE": "1"}
        start = time.time()
        cluster = LocalSlurm(work / "cluster", nodes=2, cpus_per_node=2).start()
        started = time.time() - start
        results: dict[str, list[dict[str, float]]] = {"signal": [], "partition": []}
        try:
            for i in range(args.repeats):
                results["signal"].append(run_job(cluster, work, f"signal{i}", env, "signal"))
            for i in range(args.partition_preemption):
                results["partition"].append(run_job(cluster, work, f"partition{i}", env, "partition"))
        finally:
            start = time.time()
            cluster.stop()
            stopped = time.time() - start
    print(f"local SLURM: {len(cluster.nodes)} slurmd nodes x 2 CPUs on this host; start {started:.1f} s, "
          f"stop {stopped:.1f} s")
    print(f"job: slurm/train.sbatch, 2 tasks on one node, CPU/gloo, synthetic s1 MoE, 20 steps/epoch; "
          f"seconds, median [min, max] over jobs\n")
    rows = list(results["signal"][0]) if results["signal"] else list(results["partition"][0])
    for kind, label in (("signal", "scancel --signal=USR1 --batch (= --signal=B:USR1@T)"),
                        ("partition", "preemption by a high-partition job (includes its 1 s run)")):
        runs = results[kind]
        if not runs:
            continue
        print(f"{label}: {len(runs)} job(s)")
        for key in rows:
            if kind == "partition" and rows.index(key) < 3:  # the submit rows: as above
                continue
            values = [r[key] for r in runs]
            shown = key.replace("signal ->", "preemption ->") if kind == "partition" else key
            print(f"  {shown:<42} {statistics.median(values):7.2f}  [{min(values):.2f}, {max(values):.2f}]")
        print()
    if args.json:
        Path(args.json).write_text(json.dumps({"cluster_start_s": started, **results}, indent=1))


if __name__ == "__main__":
    main()
