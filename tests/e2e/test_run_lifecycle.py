"""How a run ends, seen from outside, on CPU (gloo, the tiny config, 2-4 steps): a user's
mistake found after launch under torchrun is one message (exit 2, in torchrun's summary), ...
"""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from tests.helpers import hpt_train

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
