"""Qwen3-MoE pieces without a model: config fields, mapping rules, the fused-expert reader, the
router metrics' closed forms."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hpt_megatron.config.base import ConfigError
from hpt_megatron.models import mapping
from hpt_megatron.models.hf_io import HFCheckpointReader
from hpt_megatron.models.moe import RouterStats
from tests.unit.models import tiny_configs
from tests.unit.models.tiny_configs import parse


def test_config_fields_and_sparse_layers():
    raw = tiny_configs.qwen3_moe()
    hf = parse(raw)
    assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == (8, 2, 32)
    assert hf.moe_layers == (True, False, True, True) and hf.qk_norm
    # transformers 5 writes num_local_experts; decoder_sparse_step picks every k-th layer.
    alias = {k: v for k, v in raw.items() if k != "num_experts"}
    hf = parse({**alias, "num_local_experts": 4, "decoder_sparse_step": 2, "mlp_only_layers": []})
    assert hf.num_experts == 4 and hf.moe_layers == (False, True, False, True)
    assert not parse(tiny_configs.qwen3()).is_moe


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("shared_expert_intermediate_size", 64, "asks for shared experts"),
        ("scoring_func", "sigmoid", "non-softmax"),
        ("topk_group", 2, "grouped top-k"),
        ("mlp_only_layers", [7], "mlp_only_layers=[7] must list layer indices in [0, 4)"),
        ("num_experts", 0, "num_experts=0 must be >= 1"),
    ],
)
def test_unsupported_variants_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=key) as err:
        parse({**tiny_configs.qwen3_moe(), key: value})
    assert message in str(err.value)


def test_expert_rules():
    hf = parse(tiny_configs.qwen3_moe())
    rule = mapping.rule_for("decoder.layers.2.mlp.experts.local_experts.5.linear_fc1.weight", hf)
    assert rule.expert and rule.hf_names == (
        "model.layers.2.mlp.experts.5.gate_proj.weight",
        "model.layers.2.mlp.experts.5.up_proj.weight",
    )
    router = mapping.rule_for("decoder.layers.0.mlp.router.weight", hf)
    assert router.hf_names == ("model.layers.0.mlp.gate.weight",) and not router.expert
    with pytest.raises(KeyError, match="past num_experts=8"):
        mapping.rule_for("decoder.layers.0.mlp.experts.local_experts.8.linear_fc2.weight", hf)
    with pytest.raises(KeyError):  # dense models have no expert rules
        mapping.rule_for("decoder.layers.0.mlp.router.weight", parse(tiny_configs.qwen3()))


def test_reader_cuts_per_expert_tensors_from_the_fused_form(tmp_path):
    gate_up, down = torch.randn(3, 8, 5), torch.randn(3, 5, 4)
    save_file(
        {
            "model.layers.0.mlp.experts.gate_up_proj": gate_up,
            "model.layers.0.mlp.experts.down_proj": down,
        },
        tmp_path / "model.safetensors",
    )
    reader = HFCheckpointReader(tmp_path)
    base = "model.layers.0.mlp.experts."
    assert torch.equal(reader.get(base + "2.gate_proj.weight"), gate_up[2, :4])
    assert torch.equal(reader.get(base + "2.up_proj.weight"), gate_up[2, 4:])
    assert torch.equal(reader.get(base + "1.down_proj.weight"), down[1])
    assert reader.get_meta(base + "0.up_proj.weight").shape == (4, 5)
    assert base + "2.up_proj.weight" in reader and reader.expert_counts() == {0: 3}
    with pytest.raises(ValueError, match="fused model.layers.0.mlp.experts.down_proj is"):
        reader.get(base + "3.down_proj.weight")


def test_router_metrics_closed_forms():
    stats = RouterStats({}, num_layers=2, num_experts=4, top_k=2)
    t = 8  # tokens; uniform routing: each expert gets t*k/E tokens and probability mass t/E
    stats.sums[0] = torch.tensor([4.0] * 4 + [2.0] * 4 + [t], dtype=torch.float64)
    # Skewed: experts 0 and 1 take every token, with all the probability.
    stats.sums[1] = torch.tensor([8, 8, 0, 0, 4, 4, 0, 0, t], dtype=torch.float64)
    got = stats.collect(None)
    # E/(k T^2) * sum P_e n_e: uniform 1; skewed 4/(2*64) * (4*8 + 4*8) = 2.
    assert got["moe/load_balancing_loss"] == pytest.approx((1.0 + 2.0) / 2)
    assert got["moe/expert_load_max_over_mean"] == pytest.approx(2.0)  # 8 / 4 on layer 1
    assert got["moe/tokens_per_expert_mean"] == pytest.approx(4.0)
    assert stats.collect(None) == {}  # a fresh start
