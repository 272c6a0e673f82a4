"""The MoE router's load-balancing (aux) loss and z-loss (``model.moe_aux_loss_coeff`` /
``model.moe_z_loss_coeff``) as Megatron-core 0.16.1 adds them to training, on the tiny Qwen3-MoE
(8 experts, top-2, layers 1, 3, 4 sparse; fp32, CPU, gloo).

Megatron's definitions (``megatron/core/transformer/moe/router.py``, ``moe_utils.py``), per MoE
layer and micro-batch of ``T`` tokens (padding included: we pass no padding mask), with ``P`` the
softmax over all ``E`` experts and ``n_e`` the tokens whose top-k holds ``e``:

- aux loss ``a * E / (k T^2) * sum_e (sum_t P_te) n_e`` (``switch_load_balancing_loss_func``);
- z-loss ``z * mean_t logsumexp(logits_t)^2`` (``z_loss_func``; ``z`` over the TP x CP size, 1);

both enter the backward through ``MoEAuxLossAutoScaler`` with the gradient scale the schedule
sets, ``1 / num_microbatches`` (no ``calculate_per_token_loss``, no grad scaler in fp32), and
DDP then averages over the data-parallel ranks: the gradient is that of the losses' mean over
micro-batches and ranks. Each rank's router computes them over its own tokens: at EP=2 (two
data-parallel ranks) the value is per rank, not over the global batch.

The worker (``workers/moe_aux_loss.py``) trains one step with and one without the coefficients;
the gradients' difference is compared with autograd of the closed forms through a separate
forward. The aux loss reaches every parameter upstream of a router (its input is not detached),
none downstream (the output layer, final norm, the last MoE layer's experts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import launch
from tests.unit.models import tiny_configs

WORKER = Path(__file__).parent / "workers" / "moe_aux_loss.py"
MOE_LAYERS = ["1", "3", "4"]  # Megatron's layer numbers; layer 2 is dense
AUX, Z = 0.5, 0.05
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("aux") / "hf"
    torch.manual_seed(0)
    config = AutoConfig.for_model(**tiny_configs.qwen3_moe())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)  # routing far from uniform
    model.save_pretrained(folder)
    return folder


def _run(hf: Path, *args: str, nproc: int = 1) -> list[dict]:
    out = hf.parent / f"out{'_'.join(a.strip('-') for a in args)}.json"
    launch(WORKER, "--hf", str(hf), "--out", str(out), *args, nproc=nproc)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def aux_ep1(hf) -> dict:
    return _run(hf, "--aux", str(AUX), "--mbs", "2")[0]


def _rel(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def _check_values(result: dict, name: str, closed: str) -> None:
    """Megatron's tracker (the loss over its coefficient, summed over micro-batches) equals the
    closed form summed over the micro-batches, per MoE layer; the dense layer has none."""
    values = result["tracker"][name]
    assert len(values) == 4 and values[1] == 0.0
    for layer in MOE_LAYERS:
        want = sum(mb[layer] for mb in result[closed])
        assert _rel(values[int(layer) - 1], want) < 1e-6, (name, layer, values, want)


def _check_added(result: dict, aux: float, z: float) -> None:
    """The losses each router attached to the backward, per micro-batch: ``z`` times the z-loss
    closed form (first, on the logits), ``aux`` times the aux one (on the probabilities)."""
    assert len(result["added"]) == len(result["closed_aux"])
    for added, closed_aux, closed_z in zip(
        result["added"], result["closed_aux"], result["closed_z"], strict=True
    ):
        assert sorted(added) == MOE_LAYERS
        for layer in MOE_LAYERS:
            want = ([z * closed_z[layer]] if z else []) + ([aux * closed_aux[layer]] if aux else [])
            assert len(added[layer]) == len(want), (layer, added[layer], want)
            for got, w in zip(added[layer], want):
                assert _rel(got, w) < 1e-6, (layer, added[layer], want)


def _check_grads(result: dict) -> None:
    """Gradient with the coefficients minus without == autograd of the closed forms (averaged
    over the micro-batches) through the model; exactly 0 where no router is upstream."""
    grads = result["grads"]
    routers = [n for n in grads if n.endswith("mlp.router.weight")]
    assert len(routers) == len(MOE_LAYERS)
    for name in routers:
        g = grads[name]
        assert g["gap"] < 1e-5 * g["expected"], (name, g)
        assert g["expected"] > g["grad0"]  # the router losses dominate the difference checked
    for name, g in grads.items():
        assert g["gap"] <= 1e-5 * max(g["expected"], g["grad0"]), (name, g)
    untouched = [n for n, g in grads.items() if g["expected"] == 0.0]
    assert all(grads[n]["diff"] == 0.0 for n in untouched), untouched
    assert "module.output_layer.weight" in untouched
    assert "module.decoder.final_layernorm.weight" in untouched
    assert any("layers.3.mlp.experts" in n for n in untouched)  # the last MoE layer's experts
    assert any("layers.0.mlp.experts" in n for n in grads if n not in untouched)


def test_aux_loss_value_and_gradient_at_ep1(aux_ep1):
    assert set(aux_ep1["tracker"]) == {"load_balancing_loss"}  # no z-loss without its coeff
    _check_values(aux_ep1, "load_balancing_loss", "closed_aux")
    _check_added(aux_ep1, AUX, 0.0)
    _check_grads(aux_ep1)


def test_z_loss_value_and_gradient_at_ep1(hf):
    result = _run(hf, "--z", str(Z), "--mbs", "2")[0]
    assert set(result["tracker"]) == {"z_loss"}  # no aux loss without its coefficient
    _check_values(result, "z_loss", "closed_z")
    _check_added(result, 0.0, Z)
    _check_grads(result)


def test_aux_and_z_loss_together_in_one_micro_batch(hf):
    result = _run(hf, "--aux", str(AUX), "--z", str(Z), "--mbs", "1")[0]
    assert set(result["tracker"]) == {"load_balancing_loss", "z_loss"}
    _check_values(result, "load_balancing_loss", "closed_aux")
    _check_values(result, "z_loss", "closed_z")
    _check_added(result, AUX, Z)
    _check_grads(result)


def test_aux_loss_at_ep2_is_per_rank_over_its_tokens(hf, aux_ep1):
    """At EP=2 each rank's aux loss is the closed form over its own tokens, as EP=1's over the
    same tokens in a micro-batch of their own; Megatron's logging averages the ranks' values,
    which is not the closed form over the global batch. The router gradients equal EP=1's with
    those two micro-batches (1/M there, DDP's 1/D here)."""
    ranks = _run(hf, "--aux", str(AUX), "--ep", "2", nproc=2)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["tokens"][0] for r in ranks] == aux_ep1["tokens"]
    for rank in ranks:
        _check_values(rank, "load_balancing_loss", "closed_aux")
        _check_added(rank, AUX, 0.0)
    for layer in MOE_LAYERS:
        i = int(layer) - 1
        local = [r["tracker"]["load_balancing_loss"][i] for r in ranks]
        for value, ep1_mb in zip(local, aux_ep1["closed_aux"]):
            assert _rel(value, ep1_mb[layer]) < 1e-5, (layer, local, aux_ep1["closed_aux"])
        logged = ranks[0]["logged"]["load_balancing_loss"][i]
        assert _rel(logged, sum(local) / 2) < 1e-6
        assert ranks[1]["logged"]["load_balancing_loss"][i] == logged
        assert _rel(logged, ranks[0]["global_aux"][layer]) > 1e-3  # not the global batch's
    for name, want in aux_ep1["router_diff"].items():
        want = torch.tensor(want)
        for rank in ranks:
            got = torch.tensor(rank["router_diff"][name])
            assert float((got - want).norm()) < 1e-5 * float(want.norm()), name
