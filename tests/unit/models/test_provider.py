"""The HF -> TransformerConfig translator: pure, no process groups."""

from __future__ import annotations

import json

import pytest
import torch

from hpt_megatron.config.base import ConfigError
from hpt_megatron.config.sections import ModelConfig, ParallelConfig
from hpt_megatron.models import provider
from tests.unit.models import tiny_configs
from tests.unit.models.tiny_configs import parse


def _translate(raw: dict, model: ModelConfig | None = None, parallel: ParallelConfig | None = None):
    return provider.transformer_config_from_hf(
        parse(raw), model or ModelConfig(inline=raw), parallel or ParallelConfig(), use_te=False
    )


def test_load_hf_config_from_dir_file_and_dict(tmp_path):
    raw = tiny_configs.qwen2()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    from_dir = provider.load_hf_config(tmp_path)
    assert from_dir.to_dict() == raw and from_dir.source == str(tmp_path / "config.json")
    assert provider.load_hf_config(tmp_path / "config.json") == from_dir
    inline = provider.load_hf_config(raw)
    assert inline.to_dict() == raw and inline.source == "config.json"
    raw["vocab_size"] = 1  # the parsed config is a copy
    assert inline.vocab_size == 300 and inline.raw["vocab_size"] == 300
    with pytest.raises(ValueError, match="no Hugging Face config.json"):
        provider.load_hf_config(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        provider.load_hf_config(tmp_path)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_common_fields(name):
    cfg = _translate(tiny_configs.ALL[name]())
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 64, 96)
    assert (cfg.num_attention_heads, cfg.num_query_groups) == (8, 2)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-6
    assert cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
    assert not cfg.add_bias_linear
    assert cfg.add_qkv_bias == (name == "qwen2")
    assert cfg.qk_layernorm == (name == "qwen3")
    assert cfg.kv_channels == (16 if name == "qwen3" else 8)
    assert cfg.params_dtype == torch.float32 and not cfg.bf16


def test_llama_attention_bias_switch():
    assert _translate({**tiny_configs.llama(), "attention_bias": True}).add_qkv_bias


def _rope(**fields: object) -> provider.RopeSettings:
    raw = {k: v for k, v in tiny_configs.llama().items() if not k.startswith("rope_")}
    return provider.rope_settings(parse({**raw, **fields}))


def test_rope_settings_llama3_and_transformers5_keys():
    rope = provider.rope_settings(parse(tiny_configs.llama()))
    assert rope == provider.RopeSettings(theta=500000.0, llama3_scaling=True, scaling_factor=8.0)
    hf5 = {"rope_parameters": {"rope_type": "default", "rope_theta": 40000.0}}
    assert _rope(**hf5) == provider.RopeSettings(theta=40000.0)
    llama3 = {**tiny_configs.llama()["rope_scaling"], "rope_theta": 500000.0}
    assert _rope(rope_parameters=llama3) == rope
    with pytest.raises(ConfigError, match="config.json: rope type 'yarn'"):
        _rope(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="low_freq_factor"):
        _rope(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0})
    with pytest.raises(ConfigError, match="without a factor"):
        _rope(rope_scaling={"rope_type": "llama3"})


def test_rope_overrides_as_in_the_paper():
    model = ModelConfig(inline={"x": 1}, rope_theta=40000.0, max_position_embeddings=16384)
    raw = {**tiny_configs.qwen2(), "rope_parameters": {"rope_theta": 10000.0}}
    before = parse(raw)
    hf = provider.hf_config_with_overrides(before, model)
    assert hf.max_position_embeddings == 16384 and hf.rope_theta == 40000.0
    assert provider.rope_settings(hf).theta == 40000.0
    # raw (what is written back for the rollout servers) says the same as the fields
    assert hf.raw["max_position_embeddings"] == 16384 and hf.raw["rope_theta"] == 40000.0
    assert hf.raw["rope_parameters"] == {"rope_theta": 40000.0}
    assert hf == parse(hf.to_dict())
    assert before.rope_theta == 1000000.0 and before.raw["rope_parameters"]["rope_theta"] == 10000.0
    assert provider.hf_config_with_overrides(before, ModelConfig(inline={"x": 1})) is before


def test_precision_recompute_dropout_and_parallel_fields():
    model = ModelConfig(
        inline={"x": 1},
        params_dtype="bf16",
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
        attention_dropout=0.1,
        hidden_dropout=0.2,
    )
    parallel = ParallelConfig(tp=2, pp=2, sequence_parallel=True)
    cfg = _translate(tiny_configs.llama(), model, parallel)
    assert cfg.bf16 and cfg.params_dtype == torch.bfloat16 and cfg.pipeline_dtype == torch.bfloat16
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )
    assert (cfg.attention_dropout, cfg.hidden_dropout) == (0.1, 0.2)
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 2)
    assert cfg.sequence_parallel


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_recipes(recipe):
    model = ModelConfig(inline={"x": 1}, params_dtype="bf16", fp8="hybrid", fp8_recipe=recipe)
    cfg = provider.transformer_config_from_hf(
        parse(tiny_configs.qwen2()), model, ParallelConfig(), use_te=True, cpu_initialization=True
    )
    assert cfg.fp8 == "hybrid" and cfg.fp8_recipe == recipe
    with pytest.raises(ConfigError, match="Transformer Engine"):
        _translate(tiny_configs.qwen2(), model)


def test_parallel_errors_name_the_key_and_reason():
    with pytest.raises(
        ConfigError,
        match=r"parallel.tp=3 does not divide num_attention_heads=8 / "
        r"num_key_value_heads=2",
    ):
        provider.check_parallel_against_model(parse(tiny_configs.llama()), ParallelConfig(tp=3))
    with pytest.raises(ConfigError, match="parallel.tp=4 .*num_key_value_heads=2"):
        provider.check_parallel_against_model(parse(tiny_configs.llama()), ParallelConfig(tp=4))
    with pytest.raises(ConfigError, match="parallel.pp=4 .*num_hidden_layers=2"):
        provider.check_parallel_against_model(parse(tiny_configs.llama()), ParallelConfig(pp=4))


def test_unsupported_features_name_the_key():
    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        _translate({**tiny_configs.llama(), "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="hidden_act"):
        _translate({**tiny_configs.llama(), "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="use_sliding_window"):
        _translate({**tiny_configs.qwen2(), "use_sliding_window": True})


def test_padded_vocab_size():
    assert provider.padded_vocab_size(200, 1) == 256
    assert provider.padded_vocab_size(151936, 2) == 152064
    assert provider.padded_vocab_size(256, 2, divisible_by=128) == 256


def test_sequence_parallel_needs_transformer_engine():
    from hpt_megatron.config.base import ConfigError
    from hpt_megatron.config.sections import ModelConfig, ParallelConfig
    from hpt_megatron.models.provider import build_model

    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    with pytest.raises(ConfigError, match="parallel.sequence_parallel"):
        build_model(
            parse(hf),
            ModelConfig(inline=hf, transformer_impl="local"),
            ParallelConfig(tp=2, sequence_parallel=True),
            pre_process=True,
            post_process=True,
        )
