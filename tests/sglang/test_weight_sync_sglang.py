"""Disk weight sync into a real SGLang server on CPU from a PP=2 run, disaggregated: each pipeline
stage writes its own shards, the producer thread has the server load the folder, and older
versions are removed once a newer one is loaded."""

from __future__ import annotations

import json

import pytest

from tests.helpers import hpt_train
from tests.helpers.sglang_cpu import require_sglang

pytestmark = [pytest.mark.sglang, pytest.mark.slow]


@pytest.mark.timeout(1800)  # a CPU server's start-up alone can take minutes on a busy host
def test_pp2_disaggregated_run_syncs_every_stage_into_the_server(tmp_path):
    require_sglang()
    out = tmp_path / "run"
    overrides = ["parallel.tp=1", "parallel.pp=2", "run.placement=disaggregated"]
    overrides += ["run.max_staleness=1", "run.steps=3", "run.val_every=0"]
    overrides += ["data.prompts_per_step=4", "rollout.n=4", "logging.progress_bar=false"]
    hpt_train.run(hpt_train.TINY, out, *overrides, *hpt_train.SGLANG_CPU, timeout=1500)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["response/length_mean"] > 0 for r in rows)
    sync = out / "rollout_weights"
    # The producer loads the newest queued push before each batch; the trainer's last one
    # (version 3) comes after the last batch and stays queued. Each load removed the older
    # folders: v0 always goes (v1 or v2 was loaded), v1 too when v2 was.
    versions = sorted(p.name for p in sync.iterdir() if p.name.startswith("v"))
    assert versions in (["v1", "v2", "v3"], ["v2", "v3"]), versions
    v3 = sync / "v3"
    shards = sorted(p.name for p in v3.glob("*.safetensors"))
    assert {s.rsplit("-", 1)[0] for s in shards} == {"model-pp0", "model-pp1"}  # both stages
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= {
        p.name for p in v3.iterdir()
    }
    from hpt_megatron.models.hf_io import HFCheckpointReader

    synced, final = HFCheckpointReader(v3), HFCheckpointReader(out / "hf")
    assert sorted(synced.weight_map) == sorted(final.weight_map)
    for name in final.weight_map:
        assert synced.get(name).float().equal(final.get(name).float()), name
