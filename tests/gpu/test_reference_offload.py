"""GPU only (skipped without CUDA): ``algorithm.reference.offload`` keeps the reference's weights
in host memory between forwards, and the offloaded reference scores exactly like the policy it
was copied from."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu

HF = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def ctx():
    from hpt_megatron.config.sections import ParallelConfig
    from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed

    context = init_distributed(ParallelConfig(), seed=1)
    yield context
    shutdown_distributed()


def test_offloaded_reference_scores_like_the_policy(ctx, tmp_path):
    from hpt_megatron.config.algorithm import ReferenceConfig
    from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
    from hpt_megatron.data.sample import Sample
    from hpt_megatron.models.provider import load_hf_config
    from hpt_megatron.trainer.batching import collate
    from hpt_megatron.trainer.build import build_policy
    from hpt_megatron.trainer.reference import ReferencePolicy

    hf, model = load_hf_config(HF), ModelConfig(inline=HF, transformer_impl="local")
    parallel, trainer = ParallelConfig(), TrainerConfig()
    policy = build_policy(hf, model, parallel, trainer, ctx, total_steps=1)
    reference = ReferencePolicy.build(hf, model, parallel, trainer, ctx, offload=True)
    ref_cfg = ReferenceConfig(offload=True)
    reference.load_weights(policy, hf, model, ref_cfg, tmp_path / "reference", fresh=True)
    on_host = [p.device.type == "cpu" for c in reference.chunks for p in c.parameters()]
    assert all(on_host)
    rng = random.Random(0)
    samples = [
        Sample(
            prompt_id=str(i),
            group_id=i,
            prompt_ids=[rng.randrange(1, 256) for _ in range(5)],
            response_ids=[rng.randrange(1, 256) for _ in range(7)],
        )
        for i in range(4)
    ]
    batches = [collate(samples, [0, 1]), collate(samples, [2, 3])]
    want = policy.forward_logprobs(batches)
    got = reference.forward_logprobs(batches)
    assert want is not None and got is not None
    for (lp, _), ref_lp in zip(want, got):
        assert torch.equal(lp, ref_lp)
    assert all(p.device.type == "cpu" for c in reference.chunks for p in c.parameters())
