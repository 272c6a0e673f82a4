"""``examples/slurm_hpt.sbatch`` on a real one-node Slurm cluster (``tests/helpers/slurm.py``):
the tiny CPU config, one node, two processes, preempted the way a cluster does it and requeued.
"""

from __future__ import annotations

import pathlib
import sys
import time

import pytest

from hpt_megatron.trainer.checkpoint_files import list_checkpoints, verify_checkpoint
from tests.e2e.test_faults import SMALL, _check_nothing_lost
from tests.helpers import hpt_train, slurm
from tests.helpers.procs import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(1200)]  # two launches
STEPS, SAVE_EVERY = 6, 4
GATED = "tests.helpers.gated_reward:held_while_gated"


def _submit(c: slurm.Cluster, out: pathlib.Path, log: pathlib.Path, gate: pathlib.Path) -> str:
    """``sbatch --requeue`` the example script from the repository root, as its header says,
    with the GPU-only lines overridden for a CPU job; its reward holds a step while ``gate``
    exists."""
    overrides = [f"run.output_dir={out}", f"run.steps={STEPS}", *SMALL]
    overrides += [
        f"checkpoint.save_every={SAVE_EVERY}",
        f"reward.fn={GATED}",
        "reward.timeout_s=600",
    ]
    env = {
        **c.env,
        "HPT_TEST_GATE": str(gate),
        "GPUS_PER_NODE": "2",  # processes per node
        "MASTER_PORT": str(free_port()),
        "HPT_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "150",  # a step and a save on a loaded machine
    }
    submitted = c.cmd(
        "sbatch", "--parsable", "--requeue", "--open-mode=append", f"--output={log}",
        "--gpus-per-node=0", "--cpus-per-task=2",
        "examples/slurm_hpt.sbatch", hpt_train.TINY, *overrides,
        cwd=ROOT, env=env,
    )  # fmt: skip
    return submitted.stdout.strip().split(";")[0]


def _over(job: dict[str, str]) -> bool:
    return job["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED")


def test_a_preempted_job_checkpoints_is_requeued_and_finishes_every_step_once(tmp_path):
    """Preemption as clusters run it: a job of a higher-priority partition needs the node, Slurm
    (``PreemptMode=REQUEUE``, a grace time) sends SIGTERM to every process of the job's step and
    torchrun forwards it to the ranks again (the same request, not a second signal); the ranks
    finish their step, checkpoint and exit 0, torchrun exits 1, and the script requeues the job
    (Slurm does not requeue a job that ends inside its grace time: it would end FAILED). The
    requeued run resumes and finishes: every step logged once, the job COMPLETED, exit 0."""
    out, log, gate = tmp_path / "run", tmp_path / "job.out", tmp_path / "gate"
    gate.touch()  # step 1 is held until the ranks have the signal: a fast machine would finish
    with slurm.cluster(grace=200) as c:
        job_id = _submit(c, out, log, gate)
        c.wait_job(job_id, lambda j: (tmp_path / "held").exists(), 300, "step 1 held")
        c.cmd("sbatch", "--partition=high", f"--output={tmp_path}/high.out", "--wrap", "true")
        c.wait_job(job_id, lambda j: "SIGTERM received" in log.read_text(), 120, "SIGTERM seen")
        gate.unlink()
        c.wait_job(job_id, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", 300,
                   "requeued")  # fmt: skip
        # Slurm holds a requeued job for about 2 minutes (its BeginTime); start it now, but in a
        # later second than its previous run ended in: slurmd refuses a launch whose credential
        # is from the second the previous run's was revoked in ("Job credential revoked")
        time.sleep(1.5)
        c.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        final = c.wait_job(job_id, _over, 400, "finished")
        text = log.read_text()
        assert (final["JobState"], final["ExitCode"]) == ("COMPLETED", "0:0"), (
            f"{final}\n{text[-5000:]}\n{c.logs()}"
        )
        assert final["Restarts"] == "1"
    # what the batch script got from `bash launch_multinode.sh` when preempted: torchrun's 1
    assert f"job {job_id}: preempted; launcher exit 1; requeueing" in text, text[-5000:]
    assert "hpt: second SIGTERM" not in text
    assert "hpt: stopped by SIGTERM after step 1;" in text, text[-5000:]
    stopped = 1  # the held step; saved because it was stopped (SAVE_EVERY does not divide it)
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:06d}'} at step {stopped}" in text
    _check_nothing_lost(out, STEPS)
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == f"step_{STEPS:06d}" and verify_checkpoint(newest) is None
