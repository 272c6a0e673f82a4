"""Sequence packing changes nothing but the layout: the log-probs before a step, its loss, every
entry of its gradient and the log-probs after it equal the padded path's at the same TP/PP
layout (fp32)."""

import json
import pathlib

import pytest

from tests.distributed.launch import launch

WORKER = pathlib.Path(__file__).parent / "workers" / "train_parity.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _max_abs(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    ckpt, out = tmp / "ckpt", tmp / "ref.json"
    launch(WORKER, "--ckpt", str(ckpt), "--out", str(out), "--save", "--grads", nproc=1)
    return ckpt, json.loads(out.read_text())


def _run(ckpt, tmp_path, name, *args, nproc):
    out = tmp_path / f"{name}.json"
    launch(WORKER, "--ckpt", str(ckpt), "--out", str(out), "--grads", *args, nproc=nproc)
    return json.loads(out.read_text())


# A 40-token budget: rows of up to the longest sequence (<= 20 tokens), two per micro-batch.
PACKED = ["--packing", "--max-tokens", "40"]


@pytest.mark.parametrize("layout", [[], ["--tp", "2"], ["--pp", "2"]], ids=["tp1", "tp2", "pp2"])
def test_packed_equals_padded(checkpoint, layout, tmp_path):
    ckpt, ref = checkpoint
    nproc = 1 if not layout else 2
    padded = ref if not layout else _run(ckpt, tmp_path, "padded", *layout, nproc=nproc)
    packed = _run(ckpt, tmp_path, "packed", *layout, *PACKED, nproc=nproc)
    # Fewer rows than sequences (some rows hold several), in several micro-batches.
    assert packed["model_rows"] < len(packed["before"]) and packed["num_microbatches"] > 1
    assert _max_abs(padded["before"], packed["before"]) < 1e-6
    assert abs(padded["loss"] - packed["loss"]) < 1e-6
    assert abs(padded["grad_norm"] - packed["grad_norm"]) / padded["grad_norm"] < 1e-6
    # Every gradient entry, rank by rank (each rank's shard of the same layout).
    for grad_padded, grad_packed in zip(padded["grads"], packed["grads"], strict=True):
        assert len(grad_padded) == len(grad_packed) > 1000
        scale = max(abs(g) for g in grad_padded)
        assert max(abs(x - y) for x, y in zip(grad_padded, grad_packed)) < 1e-6 * scale
    # After one update the log-probs depend on every gradient entry, not just its norm.
    assert _max_abs(padded["after"], packed["after"]) < 1e-5
    assert _max_abs(padded["before"], padded["after"]) > 1e-3  # the step moved the model
