"""A non-finite loss skips the Megatron update on a real engine: the weights and the LR schedule
stay as they were, and the next finite update trains normally."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from tests.distributed.launch import launch

WORKER = pathlib.Path(__file__).parent / "workers" / "nonfinite_step.py"
pytestmark = [pytest.mark.distributed, pytest.mark.faults]


def test_nan_loss_skips_the_update_and_the_next_one_trains(tmp_path):
    out = tmp_path / "result.json"
    launch(WORKER, "--out", str(out), nproc=1)
    result = json.loads(out.read_text())
    skipped, norm, loss = result["bad"]
    assert skipped and math.isnan(loss) and not math.isfinite(norm)
    assert result["same_after_bad"]
    skipped, norm, loss = result["good"]
    assert not skipped and math.isfinite(norm) and math.isfinite(loss)
    assert result["changed_after_good"]
    assert result["lr_steps"] == 1  # the schedule advanced for the applied update only
