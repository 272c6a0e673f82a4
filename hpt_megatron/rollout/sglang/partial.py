"""Partial rollouts on SGLang (``rollout.partial``): responses that continue across weight pushes.

At a push the engine aborts the requests in flight (``POST /abort_request``); SGLang answers each
aborted ``/generate`` with what it had generated (``finish_reason`` ``abort``, the tokens and their
log-probs). Each sample keeps that part, with the weight version of every token, and is sent again
as prompt + partial response with the budget left, to continue under the new weights (as slime
does). The continuation's prompt is prefilled with the new weights; the tokens keep the
log-probs they were sampled with, which is what the staleness accounting and decoupled PPO's
correction read (``Generation.token_versions``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from hpt_megatron.rollout.base import Generation, SamplingParams
from hpt_megatron.rollout.seeds import derive_seed
from hpt_megatron.rollout.sglang.client import SGLangClient
from hpt_megatron.rollout.sglang.protocol import parse_generation, sampling_payload


@dataclass
class PartialSample:
    """One sample of a request: its prompt and what it generated so far, segment by segment.

    Args:
        prompt_index: into the request's prompt list.
        prompt: the prompt's token ids.
        rank: the sample's index in the request (prompt ``i``'s ``j``-th of ``n``: ``i * n + j``),
            which seeds its continuations.
    """

    prompt_index: int
    prompt: list[int]
    rank: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # per token
    finish_reason: str = "abort"
    first_version: int | None = None  # the version of the first segment (tokens or not)
    routed_experts: torch.Tensor | None = None
    segments: int = 0

    def extend(self, gen: Generation) -> None:
        """Append the segment ``gen`` generated (from this sample's prompt + tokens so far): its
        tokens, their log-probs and version; its finish reason and routed experts (those of the
        last segment cover the whole sequence) replace the previous ones."""
        if gen.token_versions is not None and len(gen.token_versions) != len(gen.token_ids):
            raise ValueError(
                f"{len(gen.token_versions)} token versions for {len(gen.token_ids)} tokens"
            )
        self.token_ids += gen.token_ids
        if self.logprobs is None or gen.logprobs is None:
            self.logprobs = None
        else:
            self.logprobs += gen.logprobs
        self.versions += gen.token_versions or [gen.weight_version] * len(gen.token_ids)
        if self.first_version is None:
            self.first_version = gen.weight_version
        self.finish_reason = gen.finish_reason
        self.routed_experts = gen.routed_experts
        self.segments += 1

    def budget(self, max_new_tokens: int) -> int:
        """Tokens it may still generate."""
        return max_new_tokens - len(self.token_ids)

    def continues(self, max_new_tokens: int) -> bool:
        """Whether it was aborted with budget left (to be sent again)."""
        return self.finish_reason == "abort" and self.budget(max_new_tokens) > 0

    def continuation(self) -> list[int]:
        """The input of its next request: prompt + the tokens so far."""
        return self.prompt + self.token_ids

    def generation(self, max_new_tokens: int) -> Generation:
        """The stitched response. ``weight_version`` is the version it started with (the first
        token's, or the first segment's when that one generated nothing); ``token_versions`` are
        set when its tokens come from more than one version. A sample aborted with no budget
        left (the push came at its last token) finished by length."""
        started = self.versions[0] if self.versions else (self.first_version or 0)
        reason = self.finish_reason
        if reason == "abort" and self.budget(max_new_tokens) <= 0:
            reason = "length"
        return Generation(
            prompt_index=self.prompt_index,
            token_ids=list(self.token_ids),
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=reason,
            weight_version=started,
            token_versions=list(self.versions) if len(set(self.versions)) > 1 else None,
            routed_experts=self.routed_experts,
        )


def start_samples(prompts: list[list[int]], gens: list[Generation], n: int) -> list[PartialSample]:
    """The samples of a first round's generations (``n`` per prompt, grouped in prompt order)."""
    if len(gens) != n * len(prompts):
        raise RuntimeError(f"{len(gens)} generations for {len(prompts)} prompts x {n}")
    samples = []
    for rank, gen in enumerate(gens):
        sample = PartialSample(gen.prompt_index, prompts[gen.prompt_index], rank)
        sample.extend(gen)
        samples.append(sample)
    return samples


async def continue_samples(
    client: SGLangClient, samples: list[PartialSample], params: SamplingParams, weight_version: int
) -> list[Generation]:
    """The next segment of each aborted sample: one request each, its prompt + partial response
    as the input, with the budget it has left (and its own seed, whose draws go on at the later
    positions)."""
    base = sampling_payload(params)

    async def one(sample: PartialSample) -> Generation:
        sampling = {**base, "max_new_tokens": sample.budget(params.max_new_tokens)}
        if client.seeded_sampling and params.seed is not None:
            sampling["sampling_seed"] = derive_seed(params.seed, "sample", rank=sample.rank)
        inputs = sample.continuation()
        payload = {"input_ids": inputs, "sampling_params": sampling, **client.asks()}
        out = await client.request(
            "/generate", payload, timeout_s=client.request_timeout_s, group=sample.prompt
        )
        item = out[0] if isinstance(out, list) else out
        return parse_generation(
            item,
            sample.prompt_index,
            weight_version,
            prompt=inputs,
            routed_top_k=client.routed_top_k,
        )

    return list(await asyncio.gather(*(one(s) for s in samples)))
