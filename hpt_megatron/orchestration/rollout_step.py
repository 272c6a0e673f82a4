"""The driver's half of a step: generate n responses per prompt, grade them, make Samples."""

from __future__ import annotations

from typing import Any

from hpt_megatron.config.data import RewardConfig
from hpt_megatron.data.records import PromptRecord
from hpt_megatron.data.sample import Sample
from hpt_megatron.rewards import RewardPool
from hpt_megatron.rollout.base import RolloutEngine, SamplingParams


def generate_samples(
    engine: RolloutEngine, prompts: list[PromptRecord], params: SamplingParams, tokenizer: Any
) -> list[Sample]:
    """``params.n`` rollouts per prompt; ``group_id`` is the prompt's index in ``prompts``."""
    generations = engine.generate([p.prompt_ids for p in prompts], params)
    texts = tokenizer.batch_decode([g.token_ids for g in generations], skip_special_tokens=True)
    samples = []
    for gen, text in zip(generations, texts):
        prompt = prompts[gen.prompt_index]
        samples.append(
            Sample(
                prompt_id=prompt.prompt_id,
                group_id=gen.prompt_index,
                prompt_ids=list(prompt.prompt_ids),
                response_ids=list(gen.token_ids),
                rollout_logprobs=gen.logprobs,
                ground_truth=prompt.ground_truth,
                response_text=text,
                finish_reason=gen.finish_reason,
                weight_version=gen.weight_version,
                metadata={"data_source": prompt.data_source},
            )
        )
    return samples


def grade_samples(pool: RewardPool, samples: list[Sample], cfg: RewardConfig) -> None:
    """Fill ``sample.reward`` in place (a hang or crash scores 0, see ``RewardPool``)."""
    if not samples:
        return
    rewards = pool.grade(
        [s.response_text or "" for s in samples],
        [s.ground_truth or "" for s in samples],
        [cfg.fn_for(s.metadata.get("data_source", "")) for s in samples],
    )
    for sample, reward in zip(samples, rewards):
        sample.reward = float(reward)
