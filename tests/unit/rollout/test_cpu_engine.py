"""The CPU rollout engine: parity with HF generate and teacher forcing, seeds, weights, stops."""

from __future__ import annotations

import os

import pytest
import torch

from hpt_megatron.rollout.base import RolloutEngine, SamplingParams
from hpt_megatron.rollout.cpu_engine import HFCpuEngine
from hpt_megatron.rollout.sampling import processed_logprobs
from tests.helpers.tiny_hf import build_byte_tokenizer, build_tiny_model, tiny_config

PAD = 257
PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12], [40, 41, 42]]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    # init_std 0.2: logits of a few units, so float32 rounding stays well under 1e-5.
    return build_tiny_model(config=tiny_config(request.param), init_std=0.2)


@pytest.fixture
def engine(model: torch.nn.Module) -> HFCpuEngine:
    return HFCpuEngine(model, build_byte_tokenizer(), max_batch_rows=64)


def _teacher_forced(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Logits ``[len(response), V]`` predicting each response token, from one unpadded forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : -1]


def test_implements_protocol(engine: HFCpuEngine) -> None:
    assert isinstance(engine, RolloutEngine)


def test_greedy_matches_hf_generate(model: torch.nn.Module, engine: HFCpuEngine) -> None:
    gens = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    L = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (L - len(p)) + p for p in PROMPTS])
    mask = (ids != PAD).long()
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=[],
        )
    for gen, row in zip(gens, ref[:, L:].tolist()):
        assert gen.token_ids == row[: len(gen.token_ids)]
        assert gen.finish_reason == "stop" or len(gen.token_ids) == 12


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, -1), (0.7, 0.9, 20)])
def test_logprobs_equal_teacher_forced(
    model: torch.nn.Module, engine: HFCpuEngine, temperature: float, top_p: float, top_k: int
) -> None:
    params = SamplingParams(
        n=3, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=16, seed=3
    )
    gens = engine.generate(PROMPTS, params)
    assert [g.prompt_index for g in gens] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    for gen in gens:
        logits = _teacher_forced(model, PROMPTS[gen.prompt_index], gen.token_ids)
        idx = torch.tensor(gen.token_ids)[:, None]
        raw = torch.log_softmax(logits, -1).gather(-1, idx).squeeze(-1)
        sampled = processed_logprobs(logits, params).gather(-1, idx).squeeze(-1)
        torch.testing.assert_close(torch.tensor(gen.logprobs), raw, atol=1e-5, rtol=0)
        # Dividing by the temperature scales the padded-vs-unpadded rounding by 1 / T.
        atol = 1e-5 / min(temperature, 1.0)
        torch.testing.assert_close(torch.tensor(gen.sampling_logprobs), sampled, atol=atol, rtol=0)
        assert torch.isfinite(sampled).all()  # never samples outside top-k / top-p
    if temperature == 1.0:
        assert all(g.logprobs == g.sampling_logprobs for g in gens)


def test_seed_determinism(engine: HFCpuEngine) -> None:
    params = SamplingParams(n=4, max_new_tokens=10, seed=11)
    first = engine.generate(PROMPTS, params)
    again = engine.generate(PROMPTS, params)
    other = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=10, seed=12))
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_chunking_keeps_prompt_order(model: torch.nn.Module) -> None:
    small = HFCpuEngine(model, max_batch_rows=4)
    gens = small.generate(PROMPTS, SamplingParams(n=3, temperature=0, max_new_tokens=5))
    big = HFCpuEngine(model).generate(PROMPTS, SamplingParams(n=3, temperature=0, max_new_tokens=5))
    assert [g.prompt_index for g in gens] == [g.prompt_index for g in big]
    assert [g.token_ids for g in gens] == [g.token_ids for g in big]


def test_update_weights_changes_outputs_and_version(engine: HFCpuEngine) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=8)
    before = engine.generate(PROMPTS, params)
    other = build_tiny_model(config=engine.model.config, seed=123, init_std=0.2)
    state = list(other.state_dict().items())
    engine.update_weights([state[: len(state) // 2], state[len(state) // 2 :]], version=5)
    after = engine.generate(PROMPTS, params)
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    assert {g.weight_version for g in after} == {5}
    fresh = HFCpuEngine(other).generate(PROMPTS, params)
    assert [g.token_ids for g in after] == [g.token_ids for g in fresh]


def test_update_weights_rejects_unknown_name_and_bad_shape(engine: HFCpuEngine) -> None:
    with pytest.raises(ValueError, match="unknown weight 'model.nope.weight'"):
        engine.update_weights([[("model.nope.weight", torch.zeros(2))]], version=1)
    name, tensor = next(iter(engine.model.state_dict().items()))
    with pytest.raises(ValueError, match=f"{name} has shape"):
        engine.update_weights([[(name, torch.zeros(tensor.shape[0] + 1))]], version=1)


def test_update_weights_from_disk(tmp_path, engine: HFCpuEngine) -> None:
    other = build_tiny_model(tmp_path, config=engine.model.config, seed=7, with_tokenizer=False)
    engine.update_weights_from_disk(tmp_path, version=2)
    params = SamplingParams(temperature=0, max_new_tokens=6)
    got = engine.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [
        g.token_ids for g in HFCpuEngine(other).generate(PROMPTS, params)
    ]


def test_stop_strings_and_stop_tokens(model: torch.nn.Module) -> None:
    engine = HFCpuEngine(model, build_byte_tokenizer())
    tok = engine.tokenizer
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    # Stop on the text of each greedy response's 3rd..4th tokens: it must end right there.
    for prompt, gen in zip(PROMPTS, free):
        stop = tok.decode(gen.token_ids[2:4])
        if not stop or stop in tok.decode(gen.token_ids[:3]):
            continue  # ambiguous text (a replacement char or an earlier occurrence)
        [cut] = engine.generate(
            [prompt], SamplingParams(temperature=0, max_new_tokens=12, stop_strings=[stop])
        )
        assert cut.token_ids == gen.token_ids[:4] and cut.finish_reason == "stop"
    [cut] = engine.generate(
        PROMPTS[:1],
        SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[free[0].token_ids[1]]),
    )
    assert cut.token_ids == free[0].token_ids[:2] and cut.finish_reason == "stop"


def test_eos_stops_and_finished_rows_drop_out(model: torch.nn.Module) -> None:
    free = HFCpuEngine(model, eos_token_ids=[]).generate(
        PROMPTS, SamplingParams(temperature=0, max_new_tokens=10)
    )
    eos = free[1].token_ids[3]  # make prompt 1 end after 4 tokens; the others run on
    gens = HFCpuEngine(model, eos_token_ids=[eos]).generate(
        PROMPTS, SamplingParams(temperature=0, max_new_tokens=10)
    )
    for ref, gen in zip(free, gens):
        cut = ref.token_ids.index(eos) + 1 if eos in ref.token_ids else len(ref.token_ids)
        assert gen.token_ids == ref.token_ids[:cut]
        assert gen.finish_reason == ("stop" if eos in ref.token_ids else "length")


def test_user_errors(engine: HFCpuEngine) -> None:
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(PROMPTS, SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        HFCpuEngine(engine.model).generate(PROMPTS, SamplingParams(stop_strings=["x"]))
    with pytest.raises(ValueError, match="no config.json"):
        HFCpuEngine.from_pretrained("/nonexistent/model")


def test_from_pretrained_loads_tokenizer(tmp_path) -> None:
    build_tiny_model(tmp_path)
    engine = HFCpuEngine.from_pretrained(tmp_path)
    assert engine.tokenizer is not None and engine.eos_token_ids == [256]
    engine.shutdown()
    assert not engine.health()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(PROMPTS, SamplingParams())


def test_threads_used_while_generating_and_restored(model: torch.nn.Module) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    hook = model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        params = SamplingParams(temperature=1.0, max_new_tokens=4, n=2, seed=3)
        one = HFCpuEngine(model, max_batch_rows=64, threads=1).generate(PROMPTS, params)
        two = HFCpuEngine(model, max_batch_rows=64, threads=2).generate(PROMPTS, params)
    finally:
        hook.remove()
    assert set(seen) == {1, 2} and torch.get_num_threads() == before
    # Threads change the speed, not the samples.
    assert [g.token_ids for g in one] == [g.token_ids for g in two]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        HFCpuEngine(model, threads=0)


def test_generation_threads_auto_gives_idle_ranks_cores(monkeypatch) -> None:
    from hpt_megatron.config import load_config
    from hpt_megatron.rollout.plan import generation_threads

    own = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    sync = load_config("examples/tiny_cpu.yaml")
    assert generation_threads(sync) == max(1, min(2 * own, cores))
    off = load_config(
        "examples/tiny_cpu.yaml", ["run.placement=disaggregated", "run.max_staleness=1"]
    )
    assert generation_threads(off) == own
    fixed = load_config("examples/tiny_cpu.yaml", ["rollout.cpu.threads=3"])
    assert generation_threads(fixed) == 3
    # Every rank generating at once: the node's cores split over its two ranks.
    assert generation_threads(sync, data_parallel=True) == max(own, cores // 2)
    assert generation_threads(fixed, data_parallel=True) == 3


def test_data_parallel_generation_is_on_where_it_runs_and_rejected_where_not(tmp_path) -> None:
    from hpt_megatron.config import ConfigError, load_config
    from hpt_megatron.orchestration.preflight import preflight
    from hpt_megatron.rollout.plan import data_parallel_generation

    tiny = "examples/tiny_cpu.yaml"
    auto = load_config(tiny)
    assert auto.rollout.cpu.data_parallel is None
    assert data_parallel_generation(auto, 2) and not data_parallel_generation(auto, 1)
    assert not data_parallel_generation(load_config(tiny, ["rollout.cpu.data_parallel=false"]), 2)
    async_ = ["run.placement=disaggregated", "run.max_staleness=1"]
    assert not data_parallel_generation(load_config(tiny, async_), 2)
    preflight(load_config(tiny, ["rollout.cpu.data_parallel=true"]), 2)
    wrong = {
        "disaggregated placement": async_,
        "rollout.engine is sglang": ["rollout.engine=sglang"],
    }
    for why, overrides in wrong.items():
        cfg = load_config(tiny, ["rollout.cpu.data_parallel=true", *overrides])
        with pytest.raises(ConfigError, match=f"rollout.cpu.data_parallel: .*{why}"):
            preflight(cfg, 2)


def test_partial_rollout_continues_with_new_weights_and_keeps_each_tokens_logprob() -> None:
    """A weight push lands between decode steps 3 and 4: the response carries two versions, the
    first tokens' log-probs are the old model's, the later ones those of the new weights reading
    the KV cache the old weights wrote (computed here with HF's own cache, one token at a time)."""
    from transformers import DynamicCache

    config = tiny_config("llama")
    old = build_tiny_model(config=config, init_std=0.2, seed=0)
    new_state = build_tiny_model(config=config, init_std=0.2, seed=1).state_dict()
    engine = HFCpuEngine(build_tiny_model(config=config, init_std=0.2, seed=0), max_batch_rows=8)
    calls = []

    def push_on_third_step() -> None:
        calls.append(1)
        if len(calls) == 3:
            engine.update_weights([list(new_state.items())], version=7)

    engine.decode_hook = push_on_third_step
    prompt = [5, 6, 7, 8]
    (gen,) = engine.generate([prompt], SamplingParams(max_new_tokens=8, seed=4, temperature=1.0))
    assert len(gen.token_ids) == 8, "the test needs a response that runs past the push"
    assert gen.token_versions == [0, 0, 0, 7, 7, 7, 7, 7] and gen.weight_version == 0

    # Reference: the old model over the prompt and the first tokens, then the new weights.
    ref, cache = old, DynamicCache(config=old.config)
    ids = prompt + gen.token_ids
    want = []
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True).logits
        for t in range(8):
            want.append(torch.log_softmax(logits[0, -1].float(), -1)[gen.token_ids[t]].item())
            if t == 2:
                ref.load_state_dict(new_state)
            step_ids = torch.tensor([[ids[len(prompt) + t]]])
            logits = ref(input_ids=step_ids, cache=cache, use_cache=True).logits
    assert gen.logprobs == pytest.approx(want, abs=1e-5)
    # The new weights changed the later log-probs (the check above is not vacuous).
    fresh = build_tiny_model(config=config, init_std=0.2, seed=0)
    assert gen.logprobs[3:] != pytest.approx(
        _teacher_forced(fresh, prompt, gen.token_ids)
        .log_softmax(-1)[torch.arange(3, 8), gen.token_ids[3:]]
        .tolist(),
        abs=1e-3,
    )


def test_recorded_routing_is_the_routing_of_a_full_forward() -> None:
    """Routing replay: each generation's experts (prompt from the shared prefill, response
    tokens from the decode steps, rows finishing at different steps) are what HF's routers pick
    in one unpadded forward of prompt + response, all but the last token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.unit.models import tiny_configs

    torch.manual_seed(0)
    config = AutoConfig.for_model(**tiny_configs.qwen3_moe())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    engine = HFCpuEngine(model, record_routing=True, eos_token_ids=range(0, 300, 5))
    gens = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, seed=1))
    assert len({len(g.token_ids) for g in gens}) > 1  # rows left the batch at different steps
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert len(routers) == 3  # the second of four layers is dense
    for gen in gens:
        ids = PROMPTS[gen.prompt_index] + gen.token_ids
        seen: list[torch.Tensor] = []
        hooks = [
            r.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out[2]))
            for r in routers
        ]
        with torch.no_grad():
            model(torch.tensor([ids]))
        for hook in hooks:
            hook.remove()
        want = torch.stack(seen, dim=1)[:-1]
        assert gen.routed_experts is not None and gen.routed_experts.dtype == torch.uint8
        assert torch.equal(gen.routed_experts.long().sort(-1).values, want.sort(-1).values)


def test_record_routing_on_a_dense_model_is_an_error(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="no mixture-of-experts layer"):
        HFCpuEngine(model, record_routing=True)
