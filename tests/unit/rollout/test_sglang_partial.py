"""Partial rollouts on SGLang (``rollout.partial``): the stitching of a sample's segments across
weight pushes, and the engine's abort-and-continue loop with a scripted client (no server)."""

from __future__ import annotations

from typing import Any

import pytest

from hpt_megatron.rollout.base import Generation, SamplingParams
from hpt_megatron.rollout.sglang import SGLangEngine
from hpt_megatron.rollout.sglang import engine as engine_module
from hpt_megatron.rollout.sglang.partial import PartialSample, start_samples
from hpt_megatron.rollout.sglang.protocol import parse_generation

PROMPT = [1, 5, 6]


def _gen(tokens: list[int], version: int, reason: str, index: int = 0) -> Generation:
    return Generation(
        prompt_index=index,
        token_ids=tokens,
        logprobs=[-0.1 * t for t in tokens],
        finish_reason=reason,
        weight_version=version,
    )


def test_segments_concatenate_tokens_logprobs_and_versions() -> None:
    sample = PartialSample(0, PROMPT, rank=0)
    sample.extend(_gen([7, 8, 9], 0, "abort"))
    assert sample.continues(max_new_tokens=8) and sample.budget(8) == 5
    assert sample.continuation() == [*PROMPT, 7, 8, 9]
    sample.extend(_gen([10, 2], 1, "stop"))
    assert not sample.continues(8)
    gen = sample.generation(8)
    assert gen.token_ids == [7, 8, 9, 10, 2]
    assert gen.logprobs == pytest.approx([-0.7, -0.8, -0.9, -1.0, -0.2])
    assert gen.token_versions == [0, 0, 0, 1, 1]
    assert gen.weight_version == 0 and gen.finish_reason == "stop"


def test_a_sample_aborted_before_its_first_token_starts_with_the_next_version() -> None:
    sample = PartialSample(0, PROMPT, rank=0)
    sample.extend(_gen([], 0, "abort"))
    sample.extend(_gen([7, 2], 1, "stop"))
    gen = sample.generation(8)
    assert gen.weight_version == 1 and gen.token_versions is None  # one version only


def test_a_sample_aborted_at_its_last_token_finished_by_length() -> None:
    sample = PartialSample(0, PROMPT, rank=0)
    sample.extend(_gen([7, 8], 0, "abort"))
    assert not sample.continues(max_new_tokens=2)
    assert sample.generation(2).finish_reason == "length"


def test_a_segment_without_logprobs_drops_them() -> None:
    sample = PartialSample(0, PROMPT, rank=0)
    sample.extend(_gen([7], 0, "abort"))
    sample.extend(Generation(prompt_index=0, token_ids=[8], logprobs=None, finish_reason="stop"))
    assert sample.generation(4).logprobs is None


def test_an_abort_answer_keeps_what_was_generated() -> None:
    """SGLang answers an aborted ``/generate`` with 200, the tokens so far and their log-probs."""
    answer = {
        "output_ids": [7, 8],
        "meta_info": {
            "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
            "output_token_logprobs": [[-0.5, 7, None], [-0.25, 8, None]],
            "weight_version": "3",
        },
    }
    gen = parse_generation(answer, 0, weight_version=2)
    assert gen.finish_reason == "abort" and gen.weight_version == 3
    sample = PartialSample(0, PROMPT, rank=0)
    sample.extend(gen)
    assert sample.continues(4) and sample.logprobs == [-0.5, -0.25]


def test_start_samples_checks_the_count() -> None:
    with pytest.raises(RuntimeError, match="3 generations for 2 prompts x 2"):
        start_samples([PROMPT, PROMPT], [_gen([7], 0, "stop")] * 3, n=2)


class _Endpoint:
    url = "http://127.0.0.1:9"
    restarts = 0

    def auth_headers(self) -> dict[str, str]:
        return {}

    def is_alive(self) -> bool:
        return True

    def health(self, timeout_s: float = 5.0) -> bool:
        return True

    def stop(self, grace_s: float = 10.0) -> None:
        pass

    def restart(self, args: list[str] | None = None) -> None:
        pass

    def log_tail(self, lines: int = 40) -> str:
        return ""


def test_a_push_aborts_the_requests_and_they_continue_with_the_new_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first round is aborted by a push (``interrupt``); the hook loads version 1 and the
    aborted sample is sent again as prompt + partial response; the finished one is not."""
    engine = SGLangEngine([_Endpoint()])
    calls: list[Any] = []

    async def generate(prompts: list[list[int]], params: SamplingParams, version: int):
        engine.interrupt()  # the trainer pushes while the round is in flight
        return [_gen([7, 8], version, "abort"), _gen([9, 2], version, "stop")]

    async def abort_all() -> None:
        calls.append("abort")

    async def continue_samples(client, samples, params, version):
        calls.append(([s.continuation() for s in samples], version, params.max_new_tokens))
        return [_gen([10, 2], version, "stop")]

    def load() -> None:
        if engine.weight_version == 0 and calls:
            engine.weight_version = 1

    monkeypatch.setattr(engine.client, "generate", generate)
    monkeypatch.setattr(engine.client, "abort_all", abort_all)
    monkeypatch.setattr(engine_module, "continue_samples", continue_samples)
    engine.decode_hook = load
    try:
        gens = engine.generate([PROMPT], SamplingParams(n=2, max_new_tokens=6))
    finally:
        engine.shutdown()
    assert calls == ["abort", ([[*PROMPT, 7, 8]], 1, 6)]
    assert [g.token_ids for g in gens] == [[7, 8, 10, 2], [9, 2]]
    assert gens[0].token_versions == [0, 0, 1, 1] and gens[0].weight_version == 0
    assert gens[1].token_versions is None and gens[1].finish_reason == "stop"


def test_an_abort_that_was_not_ours_ends_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = SGLangEngine([_Endpoint()])

    async def generate(prompts: list[list[int]], params: SamplingParams, version: int):
        return [_gen([7], version, "abort")]

    monkeypatch.setattr(engine.client, "generate", generate)
    engine.decode_hook = lambda: None
    try:
        gens = engine.generate([PROMPT], SamplingParams(n=1, max_new_tokens=6))
    finally:
        engine.shutdown()
    assert gens[0].finish_reason == "abort" and gens[0].token_ids == [7]
