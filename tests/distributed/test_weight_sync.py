"""Disk weight sync without a funnel through rank 0 (``rollout/weight_sync/disk.py``), at TP=2 and
PP=2: every exporting rank writes its own shards, the driver writes the index, and a real engine
loads the folder tensor for tensor equal to the policy (fp32, tiny Qwen2 with tied embeddings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpt_megatron.models.hf_io import HFCheckpointReader
from tests.distributed.launch import launch
from tests.helpers.tiny_hf import build_tiny_model, tiny_config

WORKERS = Path(__file__).parent / "workers"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_every_stage_writes_its_own_shards_and_the_engine_loads_them(tmp_path, tp, pp):
    hf_dir, root = tmp_path / "hf", tmp_path / "sync"
    build_tiny_model(hf_dir, config=tiny_config(num_layers=2), with_tokenizer=False)
    args = ["--tp", str(tp), "--pp", str(pp), "--hf", str(hf_dir), "--root", str(root)]
    report = json.loads(launch(WORKERS / "weight_sync_disk.py", *args).strip().splitlines()[-1])
    # The engine holds the exported policy after each version (shifted by +1 for version 2).
    assert report["max_diff"] == {"1": 0.0, "2": 0.0}
    original = HFCheckpointReader(hf_dir)
    policy_bytes = sum(original.get(n).numel() * 4 for n in original.weight_map)
    assert report["bytes"] == {"1": policy_bytes, "2": policy_bytes}
    # One folder per version; with PP=2 both stages wrote shards of their own (4 KiB buckets:
    # several per stage), the driver the index and config.json.
    files = report["files"]["2"]
    assert {"model.safetensors.index.json", "config.json"} <= set(files)
    writers = {f.rsplit("-", 1)[0] for f in files if f.endswith(".safetensors")}
    assert writers == ({"model-pp0", "model-pp1"} if pp == 2 else {"model"})
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    synced = HFCheckpointReader(root / "v2")
    assert sorted(synced.weight_map) == sorted(original.weight_map)
    for name in original.weight_map:
        assert torch.equal(synced.get(name), original.get(name) + 1.0), name
