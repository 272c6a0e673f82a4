"""Parsing ``config.json`` into ``HFModelConfig``: HF's defaults (transformers as the reference),
errors naming the file and key, read-only raw fields, and writing the file back."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoConfig

from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.hf_io import write_config
from hpt_megatron.models.provider import load_hf_config
from tests.unit.models import tiny_configs

_SIZES = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
}


def _minimal(model_type: str) -> dict:
    """Only what has no sensible default: everything else is HF's to fill in (32 heads: Qwen's
    default of 32 KV heads must divide them)."""
    return {"model_type": model_type, **_SIZES, "hidden_size": 256, "num_attention_heads": 32}


def _reference(raw: dict) -> dict:
    """The same fields as transformers computes them from ``raw`` (its config class, plus what
    its modelling code derives: Qwen2 has no head_dim attribute and always a q/k/v bias)."""
    ref = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    rope = dict(getattr(ref, "rope_parameters", None) or getattr(ref, "rope_scaling", None) or {})
    theta = getattr(ref, "rope_theta", None) or rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "vocab_size": ref.vocab_size,
        "hidden_size": ref.hidden_size,
        "intermediate_size": ref.intermediate_size,
        "num_hidden_layers": ref.num_hidden_layers,
        "num_attention_heads": ref.num_attention_heads,
        "num_key_value_heads": ref.num_key_value_heads,
        "head_dim": getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads,
        "max_position_embeddings": ref.max_position_embeddings,
        "rms_norm_eps": ref.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling,
        "tie_word_embeddings": ref.tie_word_embeddings,
        "attention_bias": getattr(ref, "attention_bias", True),
        "hidden_act": ref.hidden_act,
        "mlp_bias": getattr(ref, "mlp_bias", False),
        "use_sliding_window": getattr(ref, "use_sliding_window", False),
        "initializer_range": ref.initializer_range,
    }


def _ours(hf: HFModelConfig) -> dict:
    out = {f: getattr(hf, f) for f in _reference(_minimal("llama"))}
    out["rope_scaling"] = None if hf.rope_scaling is None else dict(hf.rope_scaling)
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_defaults_are_hfs(model_type):
    raw = _minimal(model_type)
    hf = HFModelConfig.from_dict(raw)
    assert _ours(hf) == _reference(raw)
    # Derived rather than read: no grouping, and Qwen3's fixed head size (not hidden / heads).
    assert hf.num_key_value_heads == 32
    assert hf.head_dim == (128 if model_type == "qwen3" else 8)


def test_kv_heads_must_divide_the_heads():
    raw = {k: v for k, v in tiny_configs.qwen2().items() if k != "num_key_value_heads"}
    with pytest.raises(
        ValueError,
        match=r"num_key_value_heads=32 does not divide "
        r"num_attention_heads=8 \(qwen2's default\)",
    ):
        load_hf_config(raw)
    with pytest.raises(ValueError, match="config.json: num_key_value_heads=3 does not divide"):
        load_hf_config({**raw, "num_key_value_heads": 3})
    assert load_hf_config({**raw, "num_key_value_heads": None}).num_key_value_heads == 8


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_explicit_fields_as_hf_reads_them(name, tied):
    raw = tiny_configs.ALL[name](tied)
    hf = HFModelConfig.from_dict(raw)
    assert _ours(hf) == _reference(raw)
    assert hf.model_type == name and hf.architectures == tuple(raw["architectures"])
    assert hf.qk_norm == (name == "qwen3")


def test_transformers5_keys_and_null_values():
    raw = {k: v for k, v in tiny_configs.llama().items() if not k.startswith("rope_")}
    raw["rope_parameters"] = {**tiny_configs.llama()["rope_scaling"], "rope_theta": 40000.0}
    raw.update(dtype="bfloat16", head_dim=None, num_key_value_heads=None)
    hf = HFModelConfig.from_dict(raw)
    assert _ours(hf) == _reference(raw)
    assert hf.rope_theta == 40000.0 and hf.rope_scaling["factor"] == 8.0
    assert "rope_theta" not in hf.rope_scaling
    assert (hf.head_dim, hf.num_key_value_heads, hf.torch_dtype) == (8, 8, "bfloat16")


@pytest.mark.parametrize("key", sorted(_SIZES))
def test_a_missing_size_names_the_key_and_the_file(tmp_path, key):
    raw = {k: v for k, v in tiny_configs.qwen2().items() if k != key}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: missing {key}$"):
        load_hf_config(tmp_path)
    with pytest.raises(ValueError, match=f"^config.json: missing {key}$"):
        load_hf_config(raw)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("vocab_size", "300", "vocab_size='300' is not a int"),
        ("num_attention_heads", True, "num_attention_heads=True is not a int"),
        ("rms_norm_eps", "1e-6", "rms_norm_eps='1e-6' is not a int or float"),
        ("tie_word_embeddings", 1, "tie_word_embeddings=1 is not a bool"),
        ("rope_scaling", 8.0, "rope_scaling=8.0 is not a dict"),
        ("model_type", "gpt2", "model_type='gpt2' is not supported; supported: llama, qwen2"),
    ],
)
def test_wrong_values_name_the_file_and_key(tmp_path, key, value, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**tiny_configs.llama(), key: value}))
    with pytest.raises(ValueError, match=f"^{path}: {expected}"):
        load_hf_config(path)


def test_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, got list"):
        load_hf_config(tmp_path)


def test_frozen_and_raw_read_only():
    hf = load_hf_config(tiny_configs.llama())
    with pytest.raises(dataclasses.FrozenInstanceError):
        hf.vocab_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        hf.raw["vocab_size"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        hf.rope_scaling["factor"] = 1.0  # type: ignore[index]
    copy = hf.to_dict()
    copy["rope_scaling"]["factor"] = 1.0
    assert hf.raw["rope_scaling"]["factor"] == 8.0 and hf.rope_scaling["factor"] == 8.0


def test_write_config_round_trip(tmp_path):
    hf = load_hf_config(tiny_configs.qwen3())
    write_config(hf, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == tiny_configs.qwen3()
    write_config(hf, tmp_path, torch_dtype="bfloat16")
    back = load_hf_config(tmp_path)
    assert back.torch_dtype == "bfloat16"
    assert dataclasses.replace(back, source="config.json", torch_dtype=None, raw=hf.raw) == hf
    # A transformers 5 file keeps one dtype: both keys say the same.
    write_config(
        load_hf_config({**tiny_configs.qwen3(), "dtype": "float32"}),
        tmp_path,
        torch_dtype="float16",
    )
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "float16"


def test_to_transformers():
    ref = load_hf_config(tiny_configs.qwen3()).to_transformers()
    assert type(ref).__name__ == "Qwen3Config" and ref.head_dim == 16 and ref.vocab_size == 300
