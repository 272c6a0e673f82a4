"""``hpt train`` end to end on the tiny Qwen3-MoE at expert parallel 2 (two gloo processes, the
CPU rollout engine): reward and MoE metrics, a checkpoint that resumes, an HF export written by
each expert-parallel rank for its own experts."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
import torch

from tests.helpers import hpt_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # whole `hpt train` runs

SMALL = [
    "run.val_every=0",
    "data.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "data.max_response_tokens=32",
    "checkpoint.save_every=2",
    "logging.progress_bar=false",
    "reward.num_workers=1",
]
MOE = ["moe/load_balancing_loss", "moe/expert_load_max_over_mean", "moe/tokens_per_expert_max"]


def _run(out: pathlib.Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    return hpt_train.run(hpt_train.TINY_MOE, out, f"run.steps={steps}", *SMALL, *extra)


def test_ep2_run_metrics_resume_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "moe"
    _run(out, 2)
    metrics = hpt_train.metrics(out)
    assert sorted(metrics) == [1, 2]
    for row in metrics.values():
        assert "reward/mean" in row and row["grad_norm"] > 0
        assert all(key in row for key in MOE), row
        assert row["moe/load_balancing_loss"] > 0.5  # about 1 for a random router
        assert 1.0 <= row["moe/expert_load_max_over_mean"] <= 8 / 2
    assert (out / "checkpoints" / "step_000002").is_dir()

    # The HF export: each expert-parallel rank wrote its own experts' shard.
    index = json.loads((out / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    files = {index[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(8)}
    assert len(files) == 2
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    assert model.config.model_type == "qwen3_moe"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.isfinite(logits).all()

    # Resume from the step-2 checkpoint and run one more step.
    proc = _run(out, 3)
    assert "resumed from" in proc.stderr and "step_000002" in proc.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # steps 1-2 not rerun
    resumed = hpt_train.metrics(out)
    assert sorted(resumed) == [1, 2, 3]
    assert all(key in resumed[3] for key in MOE)
    assert (out / "checkpoints" / "step_000003").is_dir()


@pytest.mark.slow
def test_ep2_run_with_routing_replay_of_bf16_rollouts(tmp_path):
    """``algorithm.options.routing_replay: rollout`` through the whole loop at EP=2: the CPU
    engine (bfloat16, so its routers pick other experts than the fp32 trainer's for some tokens)
    records the experts, the saved batch carries them, and the trainer's routers replay them."""
    from hpt_megatron.data.sample import RolloutBatch

    out = tmp_path / "replay"
    extra = ["algorithm.options.routing_replay=rollout", "rollout.cpu.dtype=bfloat16"]
    # GRPO with an entropy bonus trains every generated row (HPT's gate would send a random
    # policy's prompts to their demonstrations, which have no recorded experts).
    extra += ["algorithm.preset=grpo", "algorithm.options.entropy_coef=1e-6"]
    _run(out, 1, *extra, "logging.save_rollouts=true", "checkpoint.export_hf=false")
    row = hpt_train.metrics(out)[1]
    assert 0 < row.get("moe/replay_changed_frac", -1) < 0.5, row  # bf16 flips a few choices
    batch = RolloutBatch.load_jsonl(next((out / "rollouts").glob("step_*.jsonl")))
    generated = [s for s in batch.samples if not s.is_demo]
    assert generated
    for sample in generated:  # three MoE layers (the second of four is dense), top-2 of 8
        assert sample.routed_experts is not None
        assert tuple(sample.routed_experts.shape) == (sample.num_tokens - 1, 3, 2)
        assert int(sample.routed_experts.max()) < 8
