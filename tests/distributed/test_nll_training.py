"""A tiny Llama-style model memorises a fixed batch under token-mean NLL: the loss falls and
every parameter moves (with gradient clipping on, through the CPU clip)."""

import json
import math
import pathlib

import pytest

from tests.distributed.launch import launch

WORKER = pathlib.Path(__file__).parent / "workers" / "nll_training.py"
pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("tp", [1, 2])
def test_nll_loss_falls_and_every_parameter_changes(tp, tmp_path):
    out = tmp_path / "nll.json"
    launch(WORKER, "--tp", str(tp), "--steps", "40", "--out", str(out), nproc=tp)
    got = json.loads(out.read_text())
    losses = got["losses"]
    assert len(losses) == 40 and not any(got["skipped"])
    assert got["num_microbatches"] > 1  # gradient accumulation over micro-batches is exercised
    assert abs(losses[0] - math.log(250)) < 1.0  # starts near uniform over the vocabulary
    assert losses[-1] < 0.5 * losses[0], losses
    assert min(losses[-5:]) < min(losses[:5])
    assert got["grad_norms"][0] > 1.0  # so clipping to 1.0 was active
    assert got["num_params"] > 10 and got["unchanged"] == []
