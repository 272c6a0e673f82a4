"""A real SGLang server on CPU serving a tiny random Qwen3-MoE (needs tools/sglang_env.sh).

Every layer sparse, SGLang's own Qwen3-MoE: generation and log-probs equal Hugging Face's, and
the experts the server reports (``rollout.sglang.routed_experts``) are HF's router top-k for the
same tokens. A model with a dense layer among its sparse ones is served through SGLang's
transformers backend (its own model would drop the dense weights; preflight says so).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.sglang import SGLangEngine
from tests.helpers.sglang_cpu import server_config
from tests.helpers.tiny_hf import build_tiny_model, greedy_tokens, teacher_forced_logprobs
from tests.unit.models.tiny_configs import qwen3_moe

pytestmark = pytest.mark.sglang

PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12], [40, 41, 42]]


def _cfg(**overrides: object) -> SGLangConfig:
    return server_config(4096, **overrides)


def _build(path: Path, dense_layers: list[int]) -> torch.nn.Module:
    raw = qwen3_moe()
    raw.update(vocab_size=300, mlp_only_layers=dense_layers)  # the byte tokenizer's 259 ids
    raw.update(bos_token_id=258, eos_token_id=256, pad_token_id=257)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    return build_tiny_model(path, config=config)


@pytest.fixture(scope="module")
def sparse(sglang_python: str, tmp_path_factory: pytest.TempPathFactory):
    """(engine, HF model): every layer sparse, routed experts on."""
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    model = _build(path, dense_layers=[])
    eng = SGLangEngine.launch(
        _cfg(routed_experts=True), model_path=path, run_dir=tmp_path_factory.mktemp("run")
    )
    eng.record_routing(model.config.num_experts_per_tok)
    yield eng, model
    eng.shutdown()


def _router_top_k(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """HF's router top-k per MoE layer for every token but the last, ``[tokens - 1, layers, k]``."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    experts = [torch.topk(r.float(), k, dim=-1).indices for r in out.router_logits]
    return torch.stack(experts, dim=1)[:-1]


@pytest.fixture(scope="module")
def sampled(sparse) -> list:
    """Three samples per prompt at temperature 1 from the sparse model's server."""
    engine, _ = sparse
    return engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=5))


def test_sparse_moe_greedy_and_logprobs_equal_hf(sparse, sampled):
    engine, model = sparse
    greedy = engine.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=12))
    for prompt, gen in zip(PROMPTS, greedy):
        assert gen.token_ids == greedy_tokens(model, prompt, 12, stop_at_eos=True)
    worst = 0.0
    for gen in sampled:
        prompt = PROMPTS[gen.prompt_index]
        ref = teacher_forced_logprobs(model, prompt, gen.token_ids)
        assert gen.logprobs is not None and all(torch.isfinite(torch.tensor(gen.logprobs)))
        worst = max(worst, (torch.tensor(gen.logprobs) - ref).abs().max().item())
    assert worst < 1e-4


def test_routed_experts_are_hf_router_top_k(sparse, sampled):
    _, model = sparse
    layers, k = model.config.num_hidden_layers, model.config.num_experts_per_tok
    for gen in sampled:
        prompt = PROMPTS[gen.prompt_index]
        got = gen.routed_experts
        assert got is not None and got.dtype == torch.uint8
        assert got.shape == (len(prompt) + len(gen.token_ids) - 1, layers, k)
        ref = _router_top_k(model, prompt + gen.token_ids)
        assert torch.equal(got.long().sort(-1).values, ref.sort(-1).values)


def test_dense_layer_among_sparse_serves_through_transformers_backend(
    sglang_python: str, tmp_path: Path
):
    model = _build(tmp_path / "model", dense_layers=[1])
    cfg = _cfg(extra_args=["--skip-server-warmup", "--model-impl", "transformers"])
    engine = SGLangEngine.launch(cfg, model_path=tmp_path / "model", run_dir=tmp_path / "run")
    try:
        greedy = engine.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=12))
        for prompt, gen in zip(PROMPTS, greedy):
            assert gen.token_ids == greedy_tokens(model, prompt, 12, stop_at_eos=True)
            ref = teacher_forced_logprobs(model, prompt, gen.token_ids)
            assert gen.logprobs is not None
            # SGLang's attention and HF's differ in summation order: 8e-5 at worst measured
            assert (torch.tensor(gen.logprobs) - ref).abs().max().item() < 2e-4
    finally:
        engine.shutdown()
