"""Data-parallel generation (``rollout/replicas.py``): every rank's replica gets the policy's
weights from the in-memory sync, each generates its share of the prompts, and the driver's result
is the shares in prompt order, each exactly what one engine makes of that share with its seed;
greedy text and log-probs agree with Hugging Face's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.distributed.launch import launch
from tests.helpers.tiny_hf import (
    build_tiny_model,
    greedy_tokens,
    teacher_forced_logprobs,
    tiny_config,
)

WORKERS = Path(__file__).parent / "workers"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PROMPTS = [[5, 9, 13], [7, 1, 2, 3, 4, 8], [11], [4, 4, 4, 4], [20, 30, 40, 50, 60]]


@pytest.mark.parametrize("tp,nproc", [(2, 2), (1, 3)], ids=["tp2-2ranks", "dp3-3ranks"])
def test_replicas_generate_their_shares_with_the_synced_weights(tmp_path, tp, nproc):
    hf_dir = tmp_path / "hf"
    build_tiny_model(hf_dir, config=tiny_config(num_layers=2), with_tokenizer=False)
    out = launch(
        WORKERS / "replica_generation.py", "--tp", str(tp), "--hf", str(hf_dir), nproc=nproc
    )
    report = json.loads(out.strip().splitlines()[-1])
    # Every replica, the driver's and the others', holds the policy exactly, as version 1.
    assert report["sync"] == [[0.0, 1]] * nproc
    assert report["share_sizes"] == ([3, 2] if nproc == 2 else [2, 2, 1])
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    greedy = report["greedy"]
    assert [g["prompt_index"] for g in greedy] == list(range(len(PROMPTS)))
    for prompt, gen in zip(PROMPTS, greedy):
        assert gen["token_ids"] == greedy_tokens(model, prompt, 10, stop_at_eos=True)
    sampled = report["sampled"]
    assert [g["prompt_index"] for g in sampled] == [i for i in range(len(PROMPTS)) for _ in "abc"]
    # The shares in order, each what one engine makes of it with the replica's seed.
    offset, expected = 0, []
    for size, share in zip(report["share_sizes"], report["shares"]):
        expected += [{**g, "prompt_index": g["prompt_index"] + offset} for g in share]
        offset += size
    assert [g["token_ids"] for g in sampled] == [g["token_ids"] for g in expected]
    assert [g["prompt_index"] for g in sampled] == [g["prompt_index"] for g in expected]
    assert len({tuple(g["token_ids"]) for g in sampled}) > len(PROMPTS)  # really sampled
    worst = 0.0
    for gen in sampled:
        ref = teacher_forced_logprobs(model, PROMPTS[gen["prompt_index"]], gen["token_ids"])
        worst = max(worst, (torch.tensor(gen["logprobs"]) - ref).abs().max().item())
    # A left-padded batch against one unpadded row: 1.7e-5 and 6.1e-5 apart measured.
    assert worst < 1e-4
