"""A real SLURM cluster on this machine, for the tests and the benchmark of ``slurm/``.

Debian's ``slurm-wlm`` (22.05): slurmctld plus one slurmd per node, ``auth/none``, no
munge, cgroups or systemd, all state under one private folder, fresh ports, nothing written
to /etc (measured recipe and pitfalls: ``docs/launching.md``). The nodes are
several slurmd daemons on this host (``slurmd -N NAME``, each with its own port), named after
host names that resolve here, so that ``scontrol show hostnames`` gives a usable rendezvous
address. Two partitions: ``low`` (default) is preempted by ``high`` with requeue, and the
preempted job's batch shell gets its ``--signal`` first (``preempt_send_user_signal``).

    with LocalSlurm(tmp_dir) as cluster:
        job = cluster.sbatch("slurm/train.sbatch", "run_dir=...", options=["--ntasks-per-node=2"])
        info = cluster.wait_finished(job)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from procs import free_port

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

CONF = """\
ClusterName=moedisttest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job may start again after cred_expire + 1 s (default 120, minimum 5).
AuthInfo=cred_expire=5
MailProg=/bin/true
SlurmctldPort={ctld_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
SwitchType=switch/none
JobRequeue=1
ReturnToService=2
KillWait=10
# No accounting (no sacct): finished jobs stay visible to `scontrol show job` for 10 min.
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
{nodes}
PartitionName=low Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60 PreemptMode=REQUEUE
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""
NODE = "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory={mem} State=UNKNOWN"


def node_names(count: int) -> list[str]:
    """Names for ``count`` nodes that resolve to this machine (loopback): the short host name,
    then ``localhost``. Fewer when there are not enough."""
    names = []
    for name in (socket.gethostname().split(".")[0], "localhost"):
        try:
            if socket.gethostbyname(name).startswith("127.") and name not in names:
                names.append(name)
        except OSError:
            pass
    return names[:count]


def unavailable(install: bool = True, timeout: float = 600) -> str | None:
    """Why no local cluster can start here (None: it can), installing slurm-wlm with apt-get
    first when ``install`` and it is missing (about 15 s)."""
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as their users)"
    if not shutil.which("slurmctld") and install and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm"]):
            try:
                result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return f"`{' '.join(cmd)}` took over {timeout:.0f} s"
            if result.returncode != 0:
                return f"`{' '.join(cmd)}` failed: {(result.stderr or result.stdout).strip()[-300:]}"
    missing = [p for p in ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo") if not shutil.which(p)]
    if missing:
        return f"slurm-wlm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm)"
    return None


class LocalSlurm:
    """slurmctld + ``nodes`` slurmd daemons under ``directory``; a context manager."""

    def __init__(self, directory: str | Path, nodes: int = 2, cpus_per_node: int = 2) -> None:
        self.dir = Path(directory)
        self.nodes = node_names(nodes)
        if len(self.nodes) < nodes:
            raise RuntimeError(f"only {len(self.nodes)} host names resolve to this machine ({self.nodes})")
        self.cpus_per_node = cpus_per_node
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ daemons
    def start(self, timeout: float = 60) -> LocalSlurm:
        for sub in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        mem = _memory_mb() * 9 // 10 // len(self.nodes)
        nodes = "\n".join(NODE.format(name=n, host=socket.gethostname().split(".")[0], port=free_port(),
                                      cpus=self.cpus_per_node, mem=mem) for n in self.nodes)
        self.conf.write_text(CONF.format(host=socket.gethostname().split(".")[0], ctld_port=free_port(),
                                         dir=self.dir, nodes=nodes))
        commands = {"slurmctld": ["slurmctld", "-D", "-i"],
                    **{f"slurmd-{n}": ["slurmd", "-D", "-N", n] for n in self.nodes}}
        try:
            for name, cmd in commands.items():
                log = open(self.dir / "log" / f"{name}.out", "w")  # noqa: SIM115
                self._procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, start_new_session=True))
                log.close()
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [p.args for p in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited at start; logs in {self.dir / 'log'}")
            states = self.run("sinfo", "-h", "-N", "-p", "low", "-o", "%T", check=False).stdout.split()
            if len(states) == len(self.nodes) and all(s == "idle" for s in states):
                return
            time.sleep(0.1)
        raise RuntimeError(f"SLURM nodes not idle after {timeout:.0f} s; logs in {self.dir / 'log'}")

    def stop(self) -> None:
        """Cancel the jobs still there (their slurmstepd would outlive slurmd), then SIGTERM to
        our daemons (by PID) and wait for them: no daemon, no zombie left."""
        if self._procs and all(p.poll() is None for p in self._procs):
            try:
                jobs = self.run("squeue", "-h", "-o", "%i").stdout.split()
                if jobs:
                    self.run("scancel", "--full", *jobs, check=False)
                deadline = time.time() + 30
                while time.time() < deadline and self.run("squeue", "-h", "-o", "%i").stdout.strip():
                    time.sleep(0.2)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        for p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self._procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs
    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, script: str | Path, *args: str, options: tuple[str, ...] | list[str] = (),
               env: dict[str, str] | None = None, cwd: str | Path | None = None) -> int:
        """Submit ``script`` (``--export=ALL`` of ``env`` on top of this cluster's); the job id."""
        out = self.run("sbatch", "--parsable", "--export=ALL", *options, str(script), *args,
                       env={**self.env, **(env or {})}, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def jobs(self, job: int) -> list[dict[str, str]]:
        """``scontrol show job`` fields of a job (one dict per task of an array)."""
        out = self.run("scontrol", "show", "job", "-o", str(job)).stdout
        return [dict(re.findall(r"(\S+?)=(.*?)(?= \S+?=|$)", line)) for line in out.splitlines() if line.strip()]

    def job(self, job: int) -> dict[str, str]:
        return self.jobs(job)[0]

    def wait(self, job: int, until: Callable[[list[dict[str, str]]], bool], timeout: float,
             poll: float = 0.1) -> list[dict[str, str]]:
        deadline = time.time() + timeout
        while True:
            infos = self.jobs(job)
            if until(infos):
                return infos
            if time.time() > deadline:
                raise TimeoutError(f"job {job} after {timeout:.0f} s: "
                                   + "; ".join(f"{i.get('JobId')} {i.get('JobState')}" for i in infos))
            time.sleep(poll)

    def wait_finished(self, job: int, timeout: float = 300) -> list[dict[str, str]]:
        """Until the job (every task of an array) has finished; their fields."""
        return self.wait(job, lambda infos: all(i["JobState"] in FINISHED for i in infos), timeout)

    def cancel(self, job: int) -> None:
        self.run("scancel", str(job), check=False)


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) // 1024
