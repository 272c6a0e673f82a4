"""Tiny HF configs shared by the model tests: GQA 8 heads / 2 KV groups, a vocab needing padding.

The builders return ``config.json`` fields (dicts, to edit or write); :func:`parse` gives the
:class:`HFModelConfig` that the model code takes.
"""

from __future__ import annotations

from typing import Any

from hpt_megatron.models.hf_config import HFModelConfig

_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 300,  # pads to 384 at TP=1, 512 at TP=2
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def llama(tied: bool = False) -> dict[str, Any]:
    return {
        **_BASE,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 16384,
    }


def qwen2(tied: bool = True) -> dict[str, Any]:
    return {
        **_BASE,
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "tie_word_embeddings": tied,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
    }


def qwen3(tied: bool = False) -> dict[str, Any]:
    return {
        **_BASE,
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "tie_word_embeddings": tied,
        "head_dim": 16,  # != hidden / heads, as in real Qwen3
        "attention_bias": False,
        "rope_theta": 1000000.0,
    }


def qwen3_moe(tied: bool = False) -> dict[str, Any]:
    """8 experts, top-2, four layers of which the second is dense (``mlp_only_layers``)."""
    return {
        **qwen3(tied),
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_hidden_layers": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    }


ALL = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}


def parse(raw: dict[str, Any]) -> HFModelConfig:
    """``raw`` parsed, as ``load_hf_config`` parses inline fields."""
    return HFModelConfig.from_dict(raw)
