"""Layouts (pure torch), HF folder I/O errors, bucketing and converter user errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hpt_megatron import convert
from hpt_megatron.models import mapping
from hpt_megatron.models.export import export_hf_weights
from hpt_megatron.models.hf_io import HFCheckpointReader
from hpt_megatron.models.loading import load_hf_weights
from tests.unit.models import tiny_configs
from tests.unit.models.tiny_configs import parse

DIMS = mapping.Dims(heads=8, groups=2, head_dim=4, vocab=10)


def test_qkv_groups_and_tp_shards():
    hidden = 3
    q = torch.arange(8 * 4 * hidden, dtype=torch.float32).reshape(32, hidden)
    k = -torch.arange(1, 2 * 4 * hidden + 1, dtype=torch.float32).reshape(8, hidden)
    v = 1000 + torch.arange(2 * 4 * hidden, dtype=torch.float32).reshape(8, hidden)
    full = mapping.QKV().to_local([q, k, v], 0, 1, torch.Size([48, hidden]), DIMS)
    # group 0: query heads 0-3, key head 0, value head 0 (d = 4 rows each)
    assert torch.equal(full[:16], q[:16]) and torch.equal(full[16:20], k[:4])
    assert torch.equal(full[20:24], v[:4]) and torch.equal(full[24:40], q[16:])
    shards = [
        mapping.QKV().to_local([q, k, v], r, 2, torch.Size([24, hidden]), DIMS) for r in (0, 1)
    ]
    assert torch.equal(torch.cat(shards), full)
    assert all(torch.equal(a, b) for a, b in zip(mapping.QKV().to_hf(shards, DIMS), (q, k, v)))
    bias = [t[:, 0].contiguous() for t in (q, k, v)]
    bshards = [mapping.QKV().to_local(bias, r, 2, torch.Size([24]), DIMS) for r in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(mapping.QKV().to_hf(bshards, DIMS), bias))


def test_gate_up_is_gate_r_up_r_per_rank():
    gate, up = torch.arange(12.0).reshape(4, 3), 100 + torch.arange(12.0).reshape(4, 3)
    shards = [mapping.GateUp().to_local([gate, up], r, 2, torch.Size([4, 3]), DIMS) for r in (0, 1)]
    assert torch.equal(shards[1], torch.cat([gate[2:], up[2:]]))
    got = mapping.GateUp().to_hf(shards, DIMS)
    assert torch.equal(got[0], gate) and torch.equal(got[1], up)


def test_vocab_padding_is_zero_and_stripped():
    emb = torch.randn(10, 2)
    shards = [mapping.Vocab().to_local([emb], r, 2, torch.Size([8, 2]), DIMS) for r in (0, 1)]
    assert torch.equal(shards[1][2:], torch.zeros(6, 2))
    assert torch.equal(mapping.Vocab().to_hf(shards, DIMS)[0], emb)


def test_rules_and_tied_output():
    hf = parse(tiny_configs.qwen3(tied=False))
    rule = mapping.rule_for("decoder.layers.3.self_attention.linear_qkv.weight", hf)
    assert rule.hf_names[2] == "model.layers.3.self_attn.v_proj.weight"
    te = mapping.rule_for("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", hf)
    assert te.hf_names == ("model.layers.0.post_attention_layernorm.weight",)
    assert mapping.rule_for("output_layer.weight", hf).hf_names == ("lm_head.weight",)
    tied = mapping.rule_for("output_layer.weight", parse(tiny_configs.qwen2(tied=True)))
    assert tied.hf_names == ("model.embed_tokens.weight",) and not tied.exported
    with pytest.raises(KeyError, match="mlp.router.weight"):
        mapping.rule_for("decoder.layers.0.mlp.router.weight", hf)


class _Decoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.final_layernorm = torch.nn.Module()
        self.final_layernorm.weight = torch.nn.Parameter(torch.ones(300))
        self.layers = torch.nn.ModuleList()


class _Chunk(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = _Decoder()
        self.embedding = torch.nn.Module()
        self.embedding.word_embeddings = torch.nn.Embedding(384, 4)


def test_export_buckets_bound_the_size():
    chunk = _Chunk()
    buckets = list(export_hf_weights([chunk], parse(tiny_configs.qwen2()), bucket_bytes=1300 * 4))
    names = [[n for n, _ in b] for b in buckets]
    assert names == [["model.norm.weight"], ["model.embed_tokens.weight"]]  # 300 + 1200 > 1300
    assert buckets[1][0][1].shape == (300, 4)  # padding stripped
    assert (
        len(list(export_hf_weights([chunk], parse(tiny_configs.qwen2()), bucket_bytes=10**6))) == 1
    )
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(export_hf_weights([chunk], parse(tiny_configs.qwen2()), bucket_bytes=0))


def test_loader_names_shape_mismatch(tmp_path):
    save_file(
        {"model.norm.weight": torch.ones(7), "model.embed_tokens.weight": torch.ones(300, 4)},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(ValueError, match=r"model.norm.weight.*\[7\].*\[300\]"):
        load_hf_weights([_Chunk()], parse(tiny_configs.qwen2()), tmp_path)


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="neither model.safetensors.index.json"):
        HFCheckpointReader(tmp_path)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shard model-00001-of-00002.safetensors is missing"):
        HFCheckpointReader(tmp_path)


def test_convert_reports_user_errors(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps({**tiny_configs.llama(), "model_type": "gpt2"})
    )
    assert (
        convert.main(["hf-to-megatron", "--hf", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    )
    assert "model_type='gpt2' is not supported" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(tiny_configs.llama()))
    assert (
        convert.main(["hf-to-megatron", "--hf", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    )
    assert "neither model.safetensors.index.json nor model.safetensors" in capsys.readouterr().err
