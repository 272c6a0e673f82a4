"""Checkpoints at DP=2: both data-parallel ranks write a balanced share of the shards (Megatron's
fully parallel save, not rank 0 alone), the second background save copies its snapshot into the
first one's host buffers, an update waits for a snapshot still being taken, and the checkpoint
loads back the weights and Adam moments of the step saved exactly."""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.distributed.launch import launch

WORKER = pathlib.Path(__file__).parent / "workers" / "checkpoint_spread.py"
pytestmark = pytest.mark.distributed


def test_dp2_saves_are_spread_over_both_ranks_reuse_buffers_and_load_back(tmp_path):
    out = tmp_path / "result.json"
    launch(WORKER, "--root", str(tmp_path / "ckpt"), "--out", str(out), nproc=2)
    result = json.loads(out.read_text())
    rank0, rank1 = result["written_bytes"]["0"], result["written_bytes"]["1"]
    assert rank0 > 0 and rank1 > 0
    assert min(rank0, rank1) / max(rank0, rank1) > 0.5, result["written_bytes"]
    assert result["buffers_reused"]
    assert result["staging_wait_s"] > 0  # the update waited for the snapshot
    assert result["loaded_equals_saved"] and result["tensors"] > 0
