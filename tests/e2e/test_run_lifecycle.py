"""How a run ends, seen from outside, on CPU (gloo, the tiny config, a few steps):

- a user's mistake found after launch under torchrun is one message (exit 2, in torchrun's
  failure summary), with no rank's traceback;
- Ctrl-C (SIGINT) and a scheduler's SIGTERM sent to the torchrun launcher, as a terminal and
  Slurm send them: the ranks checkpoint at the step they reached, torchrun exits 1 (its own
  ``SignalException``, the code docs/operations.md states), and the resume continues;
- the whole output directory on a 5 MB tmpfs (the issue's case, one process): one message
  naming the path and the space left, exit 1, no traceback, no partial folder, the newest
  checkpoint intact. Each write site on its own: ``tests/unit/orchestration/test_write_errors.py``.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess

import pytest

from hpt_megatron.trainer.checkpoint_files import list_checkpoints, verify_checkpoint
from tests.e2e.test_faults import SMALL, _check_nothing_lost, _finish, _log, _wait_for_step
from tests.helpers import hpt_train
from tests.helpers.forked import run_cli
from tests.helpers.tmpfs import tmpfs

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = hpt_train.TINY
pytestmark = [pytest.mark.faults, pytest.mark.distributed, pytest.mark.slow]


def _torchrun(
    out: pathlib.Path, *overrides: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        hpt_train.command(TINY, out, "run.steps=2", "parallel.tp=1", *overrides),
        capture_output=True,
        text=True,
        env=hpt_train.env(),
        timeout=timeout,
        cwd=ROOT,
    )


def test_a_user_error_after_launch_is_one_message_exit_2_in_torchruns_summary(tmp_path):
    """An unreachable ``rollout.sglang.urls`` entry, found by rank 0 once the ranks have
    started; rank 1, waiting for rank 0 in a collective, only says it lost it."""
    url = "http://127.0.0.1:9"  # the discard port: nothing listens
    proc = _torchrun(tmp_path / "run", "rollout.engine=sglang", f"rollout.sglang.urls=[{url}]")
    message = f"hpt train: rollout.sglang.urls: the SGLang server at {url} is not usable"
    assert proc.returncode != 0  # torchrun's own code
    err = proc.stderr
    printed = [line for line in err.splitlines() if line.startswith("hpt train:")]
    assert len(printed) == 1 and printed[0].startswith(message), err[-4000:]
    assert "[rank0]" not in err and "[rank1]" not in err  # no rank's traceback
    root_cause = err.split("Root Cause (first observed failure):")[1]
    assert "exitcode  : 2" in root_cause and f"traceback : {message}" in root_cause, err[-3000:]
    assert "rank 1 lost another rank in a collective" in err  # its error file, in the summary


def _start(out: pathlib.Path, steps: int) -> subprocess.Popen:
    """A run under torchrun; the ranks get torchrun's grace of 120 s (not 30) to finish their
    step and checkpoint on a loaded machine."""
    command = hpt_train.command(TINY, out, f"run.steps={steps}", *SMALL, "checkpoint.save_every=0")
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115  # closed with the process
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=hpt_train.env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120"),
        cwd=ROOT,
        start_new_session=True,
    )


def _stopped_at(out: pathlib.Path, name: str) -> int:
    """The step the ranks stopped after on ``name``; its checkpoint is complete and newest."""
    log = _log(out)
    stopped = max(hpt_train.metrics(out))
    assert f"hpt: stopped by {name} after step {stopped}; checkpoint" in log, log[-4000:]
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == f"step_{stopped:06d}" and verify_checkpoint(newest) is None
    assert json.loads((newest / "hpt_state.json").read_text())["step"] == stopped
    assert not list((out / "checkpoints").glob("*.tmp"))
    return stopped


def test_ctrl_c_and_sigterm_to_the_launcher_checkpoint_and_the_resume_continues(tmp_path):
    out, steps = tmp_path / "run", 8
    out.mkdir()
    proc = _start(out, steps)
    _wait_for_step(out, proc, 1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the terminal signals the launcher
    assert _finish(proc) == 1, _log(out)[-4000:]  # torchrun's SignalException
    first = _stopped_at(out, "SIGINT")
    assert "KeyboardInterrupt" not in _log(out)
    proc = _start(out, steps)
    _wait_for_step(out, proc, first + 1)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends to the job's launcher
    assert _finish(proc) == 1, _log(out)[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{first:06d}'}" in _log(out)
    second = _stopped_at(out, "SIGTERM")
    assert first < second < steps
    _check_nothing_lost(out, second)  # every step up to there once, in the data order


def test_a_full_output_disk_is_one_message_and_leaves_no_partial_folder(tmp_path):
    # 8 MB: room for the one checkpoint and export the dry run asks for, not for five
    with tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk / "run"
        args = ["train", TINY, f"run.output_dir={out}", "run.steps=4", *SMALL]
        args += ["logging.tensorboard=true", "checkpoint.save_every=1", "checkpoint.keep_last=5"]
        code, log = run_cli(args, tmp_path / "run.log")
        assert code == 1, log[-4000:]
        last = log.strip().splitlines()[-1]
        assert last.startswith("hpt train: ") and f"{disk}" in last, log[-4000:]
        assert "no space left on device" in last.lower() and "bytes free" in last, last
        assert "Traceback" not in log
        assert not list(out.rglob("*.tmp")), list(out.rglob("*"))
        for checkpoint in list_checkpoints(out / "checkpoints"):
            assert verify_checkpoint(checkpoint) is None
