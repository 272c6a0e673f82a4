"""GPU only (skipped without CUDA): the Transformer Engine layer path in BF16 matches Hugging Face,
and FP8 (delayed and tensorwise recipes) trains a step with finite loss and gradients.

These are the checks that only a GPU can make; the CPU suite covers the same model code with
Megatron's local layers.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HF = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def ctx():
    from hpt_megatron.config.sections import ParallelConfig
    from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed

    context = init_distributed(ParallelConfig(), seed=1)
    yield context
    shutdown_distributed()


def _model(tmp_path, **model_options):
    from transformers import AutoModelForCausalLM

    from hpt_megatron.config.sections import ModelConfig, ParallelConfig
    from hpt_megatron.models.loading import load_hf_weights
    from hpt_megatron.models.provider import build_model, load_hf_config

    torch.manual_seed(0)
    hf = load_hf_config(HF)
    hf_model = AutoModelForCausalLM.from_config(hf.to_transformers())
    hf_model.save_pretrained(tmp_path / "hf")
    cfg = ModelConfig(inline=HF, transformer_impl="transformer_engine", **model_options)
    model = build_model(hf, cfg, ParallelConfig(), pre_process=True, post_process=True)
    load_hf_weights([model], hf, tmp_path / "hf")
    return hf_model, model


def test_te_bf16_matches_hf(ctx, tmp_path):
    from hpt_megatron.parallel.logprobs import vocab_parallel_logprobs_entropy

    hf_model, model = _model(tmp_path, params_dtype="bf16")
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        ref = torch.log_softmax(hf_model.cuda().float()(ids.cuda()).logits.float(), -1)
        ref_lp = ref[:, :-1].gather(-1, ids[:, 1:].cuda()[..., None]).squeeze(-1)
        pos = torch.arange(64).expand(2, -1).cuda()
        logits = model(ids.cuda(), pos, None)
        lp, _ = vocab_parallel_logprobs_entropy(logits[:, :-1], ids[:, 1:].cuda(), vocab_size=512)
    assert (lp - ref_lp).abs().mean() < 2e-2  # bf16 weights and activations


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_step_is_finite(ctx, tmp_path, recipe):
    _, model = _model(tmp_path, params_dtype="bf16", fp8="hybrid", fp8_recipe=recipe)
    ids = torch.randint(0, 512, (2, 64)).cuda()
    pos = torch.arange(64).expand(2, -1).cuda()
    logits = model(ids, pos, None)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
