"""A one-node Slurm cluster on this machine, in a temp dir, for the Slurm end-to-end test.

Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them): a munge key and ``munged``
on a socket of its own, ``slurmctld`` and ``slurmd`` in the foreground (``-D``) with a generated
``slurm.conf`` (this host as the one node, 2 CPUs, free ports, every state, spool, pid and log
file in the temp dir). Two partitions model preemption as clusters run it: ``low`` (the
default) is preempted by ``high`` with ``PreemptMode=REQUEUE`` and a grace time. Needs root
(the daemons run as root); the test is skipped without the binaries or root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.helpers.procs import free_port, kill_tree

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "scancel")


@dataclass
class Cluster:
    """A running cluster: ``cmd`` runs a client command (``sbatch``, ``scontrol``...) against it."""

    root: Path
    node: str
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def cmd(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``...)."""
        text = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(word.split("=", 1) for word in text.split() if "=" in word)

    def wait_job(self, job_id: str, done, timeout: float, what: str) -> dict[str, str]:
        """Poll the job until ``done(job)`` holds; fail with the logs after ``timeout`` s."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if done(job):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: {what} not within {timeout} s: {job}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.root.iterdir())
            if p.suffix in (".log", ".out")
        )


def _conf(root: Path, node: str, munge_socket: Path, grace: int) -> str:
    part = f"Nodes={node} MaxTime=INFINITE State=UP"
    return f"""\
ClusterName=hpt-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=low {part} Default=YES PriorityTier=1 GraceTime={grace}
PartitionName=high {part} PriorityTier=2 PreemptMode=OFF
"""


def _start(cluster: Cluster, *command: str) -> None:
    log = open(cluster.root / f"{Path(command[0]).name}.out", "w")  # noqa: SIM115
    cluster.daemons.append(
        subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=cluster.env, cwd=cluster.root
        )
    )
    log.close()  # the daemon holds its own copy


def _stepds() -> set[int]:
    """The live ``slurmstepd`` processes (slurmd starts one per job step, detached from it)."""
    found = set()
    for proc in psutil.process_iter(["name", "status"]):
        if proc.info["name"] == "slurmstepd" and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.add(proc.pid)
    return found


def _stop(cluster: Cluster, stepds_before: set[int]) -> None:
    """Cancel the jobs left, stop the daemons, and assert that no daemon, step or task of this
    cluster is left."""
    jobs = cluster.cmd("squeue", "-h", "-o", "%A", check=False).stdout.split()
    if jobs:
        cluster.cmd("scancel", "--full", *jobs, check=False)
    deadline = time.time() + 60
    while time.time() < deadline and (_stepds() - stepds_before):
        time.sleep(0.5)
    for pid in _stepds() - stepds_before:  # a step that outlived its job: it and its tasks
        kill_tree(pid)
    for daemon in reversed(cluster.daemons):  # slurmd, slurmctld, munged
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    left = [d.args[0] for d in cluster.daemons if psutil.pid_exists(d.pid)]
    left += [f"slurmstepd {pid}" for pid in _stepds() - stepds_before]
    assert not left, f"Slurm processes left after the cluster stopped: {left}"


@contextlib.contextmanager
def cluster(grace: int = 120) -> Iterator[Cluster]:
    """A one-node cluster for the block; ``grace``: the ``low`` partition's preemption
    ``GraceTime`` in seconds. Skips the test without the binaries or root."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): apt-get install "
            "slurm-wlm munge"
        )
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm cluster runs its daemons as root")
    # a short path: munge's socket path must fit in a sockaddr_un (108 bytes)
    root = Path(tempfile.mkdtemp(prefix="hpt-slurm-"))
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o700)
    node = socket.gethostname().split(".")[0]
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node, sock, grace))
    # no Slurm settings of an allocation the tests may run in
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    c = Cluster(root=root, node=node, env={**env, "SLURM_CONF": str(conf)})
    stepds_before = _stepds()
    try:
        _start(
            c,
            "munged",
            "-F",
            "-f",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--pid-file={root}/munge/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munge/munged.seed",
        )
        _wait(lambda: sock.exists(), 30, "munged's socket", c)
        _start(c, "slurmctld", "-D", "-i", "-f", str(conf))
        _start(c, "slurmd", "-D", "-N", node, "-f", str(conf))
        _wait(
            lambda: (
                c.cmd("sinfo", "-h", "-n", node, "-o", "%t", check=False)
                .stdout.strip()
                .startswith("idle")
            ),
            60,
            f"node {node} idle",
            c,
        )
        yield c
    finally:
        try:
            _stop(c, stepds_before)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _wait(ready, timeout: float, what: str, c: Cluster) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for daemon in c.daemons:
            if daemon.poll() is not None:
                raise AssertionError(f"{daemon.args[0]} exited {daemon.returncode}\n{c.logs()}")
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s\n{c.logs()}")
