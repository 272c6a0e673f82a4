"""Routing replay (``algorithm.options.routing_replay: rollout``) on the tiny Qwen3-MoE.

The rollout engine's routers are perturbed, so the experts it records differ from the ones the
trainer's own routers pick for many tokens. The trainer's log-probs under replay must equal a
plain Hugging Face forward of the trainer's weights whose routers are forced to the recorded
experts (probabilities recomputed from the trainer's router for them), at EP=1, EP=2, TP=2 and
PP=2; without replay they equal HF's own routing; and replay brings the trainer's log-probs
closer to the engine's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpt_megatron.data.sample import RolloutBatch, Sample
from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.cpu_engine import HFCpuEngine
from tests.distributed.launch import launch
from tests.unit.models import tiny_configs

WORKER = Path(__file__).parent / "workers" / "routing_replay.py"
PROMPTS = [[5, 17, 299, 3, 42], [7, 100, 101, 102], [1, 250, 2, 9, 8, 7, 6, 120]]
pytestmark = pytest.mark.distributed


def _forced_logprobs(model, ids: list[int], experts: torch.Tensor | None) -> torch.Tensor:
    """Log-probs of ``ids[1:]`` from HF ``model``; with ``experts`` ``[len(ids) - 1, layers, k]``
    its routers take those experts for the first tokens (HF's own top-k for the last)."""
    routers = [m.mlp.gate for m in model.model.layers if hasattr(m.mlp, "experts")]

    def force(layer: int):
        def hook(module, args, output):
            logits, _, own = output
            index = own.clone()
            index[: experts.shape[0]] = experts[:, layer].long()
            probs = torch.softmax(logits, dtype=torch.float, dim=-1).gather(1, index)
            if module.norm_topk_prob:
                probs = probs / probs.sum(-1, keepdim=True)
            return logits, probs.to(logits.dtype), index

        return hook

    handles = (
        [r.register_forward_hook(force(i)) for i, r in enumerate(routers)]
        if experts is not None
        else []
    )
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
    finally:
        for handle in handles:
            handle.remove()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("replay")
    torch.manual_seed(0)
    config = AutoConfig.for_model(**tiny_configs.qwen3_moe())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.save_pretrained(root / "hf")
    # The rollout engine: the same model with other router weights.
    engine_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    engine_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, param in engine_model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.add_(torch.randn_like(param) * 0.2)
    engine = HFCpuEngine(engine_model, record_routing=True, eos_token_ids=[])
    params = SamplingParams(n=2, max_new_tokens=10, seed=3)
    samples = [
        Sample(
            prompt_id=str(i),
            group_id=gen.prompt_index,
            prompt_ids=PROMPTS[gen.prompt_index],
            response_ids=gen.token_ids,
            rollout_logprobs=gen.logprobs,
            routed_experts=gen.routed_experts,
        )
        for i, gen in enumerate(engine.generate(PROMPTS, params))
    ]
    # A demonstration-like row without a record: the trainer's routers route it themselves.
    samples.append(Sample(prompt_id="demo", group_id=9, prompt_ids=[4, 5, 6], response_ids=[8, 9]))
    RolloutBatch(samples).save_jsonl(root / "samples.jsonl")
    replay_ref, own_ref, differ, total = {}, {}, 0, 0
    for i, s in enumerate(samples):
        ids = s.prompt_ids + s.response_ids
        n = len(s.prompt_ids) - 1
        own_ref[i] = _forced_logprobs(model, ids, None)[n:]
        replay_ref[i] = _forced_logprobs(model, ids, s.routed_experts)[n:]
        if s.routed_experts is not None:  # the trainer's own choice of experts, token by token
            own: list[torch.Tensor] = []

            def keep(module, args, output, own=own):
                own.append(output[2])

            hooks = [
                m.mlp.gate.register_forward_hook(keep)
                for m in model.model.layers
                if hasattr(m.mlp, "experts")
            ]
            with torch.no_grad():
                model(torch.tensor([ids]))
            for h in hooks:
                h.remove()
            own_bmk = torch.stack(own, 1)[:-1].sort(-1).values
            recorded = s.routed_experts.long().sort(-1).values
            differ += int((own_bmk != recorded).any(-1).sum())
            total += recorded.shape[0] * recorded.shape[1]
    return {
        "root": root,
        "samples": samples,
        "replay_ref": replay_ref,
        "own_ref": own_ref,
        "differ_share": differ / total,
    }


def _run(rollouts: dict, layout: list[str], nproc: int) -> dict:
    out = rollouts["root"] / f"out{'_'.join(layout) or '_ep1'}.json"
    args = [
        "--hf",
        str(rollouts["root"] / "hf"),
        "--samples",
        str(rollouts["root"] / "samples.jsonl"),
    ]
    launch(WORKER, *args, "--out", str(out), *layout, nproc=nproc)
    return json.loads(out.read_text())


def _check(rollouts: dict, got: dict) -> None:
    samples = rollouts["samples"]
    assert sorted(int(k) for k in got["replay"]) == list(range(len(samples)))
    replay_gap, own_gap, moved = 0.0, 0.0, 0.0
    for i, sample in enumerate(samples):
        replay, own = torch.tensor(got["replay"][str(i)]), torch.tensor(got["own"][str(i)])
        assert (replay - rollouts["replay_ref"][i]).abs().max() < 1e-4, i
        assert (own - rollouts["own_ref"][i]).abs().max() < 1e-4, i
        moved = max(moved, float((replay - own).abs().max()))
        if sample.rollout_logprobs is not None:
            engine = torch.tensor(sample.rollout_logprobs)
            replay_gap += float((replay - engine).abs().sum())
            own_gap += float((own - engine).abs().sum())
    assert moved > 1e-2  # the replayed experts are not the trainer's own
    assert replay_gap < 0.5 * own_gap  # replay removes most of the mismatch
    assert abs(got["replay_changed_frac"] - rollouts["differ_share"]) < 0.02
    if got["router_grad_norm"] is not None:  # trained at TP=1 (see the worker)
        assert got["router_grad_norm"] > 0  # gradients still reach the router under replay


def test_recorded_experts_differ_from_the_trainers_own(rollouts):
    assert 0.1 < rollouts["differ_share"] < 0.9


def test_replay_at_ep1(rollouts):
    _check(rollouts, _run(rollouts, [], nproc=1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [["--ep", "2"], ["--tp", "2"], ["--pp", "2"], ["--ep", "2", "--packing"]],
    ids=["ep2", "tp2", "pp2", "ep2-packed"],
)
def test_replay_at_a_layout(rollouts, layout):
    _check(rollouts, _run(rollouts, layout, nproc=2))
