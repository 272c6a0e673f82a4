"""From graded rollouts to the step's training samples: each preset's batch rule.

Shape legend: B responses (rows), G prompt groups.

The rules themselves (the HPT gate, DAPO's keep mask, overlong shaping) are pure functions in
``hpt_megatron.algorithms``; this module applies them to :class:`Sample` records and attaches the
per-row advantages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpt_megatron.algorithms import (
    compute_advantages,
    dynamic_sampling_keep,
    hpt_batch_plan,
    hpt_gate,
    overlong_penalty,
)
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.data.records import PromptRecord
from hpt_megatron.data.sample import TEACHER_DEMO_ROUTE, TEACHER_ROUTE, Sample

# HPT with ``teacher_route: generate``: the teacher's demonstration of each prompt given, or None
# where it wrote none worth training on (the driver's ``Driver.write_demos``).
DemoWriter = Callable[[list[PromptRecord]], list[list[int] | None]]


@dataclass
class BatchPlan:
    """The samples to train on, and what the rule decided (for metrics)."""

    samples: list[Sample]
    metrics: dict[str, float] = field(default_factory=dict)


def demo_sample(
    prompt: PromptRecord, group_id: int, *, sft_weight: float, rl_weight: float
) -> Sample:
    if prompt.demo_ids is None:
        raise ValueError(
            f"prompt {prompt.prompt_id}: the preset needs a demonstration but the dataset has none"
        )
    return Sample(
        prompt_id=prompt.prompt_id,
        group_id=group_id,
        prompt_ids=list(prompt.prompt_ids),
        response_ids=list(prompt.demo_ids),
        reward=1.0,
        is_demo=True,
        rl_weight=rl_weight,
        sft_weight=sft_weight,
        ground_truth=prompt.ground_truth,
    )


def rollouts_per_prompt(spec: AlgorithmSpec, n: int) -> int:
    """How many responses to generate per prompt for groups of ``n`` (``rollout.n``): fewer by
    the demonstrations when they take rollouts' places (``demos_replace_rollouts``)."""
    if spec.batch_rule == "demo_in_group" and spec.demos_replace_rollouts:
        return n - spec.demos_per_group
    return n


def shape_overlong(spec: AlgorithmSpec, samples: list[Sample], max_new_tokens: int) -> None:
    """DAPO's soft overlong punishment, added to the rewards in place."""
    if spec.overlong_buffer is None:
        return
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float64)
    penalty = overlong_penalty(
        response_lengths=lengths,
        max_len=spec.overlong_max_len or max_new_tokens,
        buffer=spec.overlong_buffer,
        factor=spec.overlong_penalty,
    )
    for sample, p in zip(samples, penalty.tolist()):
        sample.reward = float(sample.reward or 0.0) + p


def apply_batch_rule(
    spec: AlgorithmSpec,
    prompts: list[PromptRecord],
    rollouts: list[Sample],
    write_demos: DemoWriter | None = None,
) -> BatchPlan:
    """Select or augment ``rollouts`` (``group_id`` = prompt index) per ``spec.batch_rule``;
    ``write_demos``: the teacher that writes HPT's missing demonstrations (``teacher_route:
    generate``)."""
    rule = spec.batch_rule
    if rule == "hpt_gate":
        return _hpt(spec, prompts, rollouts, write_demos)
    if rule == "demo_in_group":
        extra = [
            demo_sample(p, g, sft_weight=0.0, rl_weight=1.0)
            for g, p in enumerate(prompts)
            for _ in range(spec.demos_per_group)
        ]
        return BatchPlan(rollouts + extra, {"demo_rows": float(len(extra))})
    if rule == "dynamic_sampling":
        rewards = torch.tensor([float(s.reward or 0.0) for s in rollouts])
        groups = torch.tensor([s.group_id for s in rollouts])
        keep = dynamic_sampling_keep(rewards=rewards, group_ids=groups)
        kept = [s for s, k in zip(rollouts, keep.tolist()) if k]
        return BatchPlan(kept, {"dynamic_sampling/kept_share": len(kept) / max(1, len(rollouts))})
    return BatchPlan(list(rollouts))


def _hpt(
    spec: AlgorithmSpec,
    prompts: list[PromptRecord],
    rollouts: list[Sample],
    write_demos: DemoWriter | None,
) -> BatchPlan:
    rewards = torch.tensor([float(s.reward or 0.0) for s in rollouts], dtype=torch.float64)
    groups = torch.tensor([s.group_id for s in rollouts])
    gate = hpt_gate(
        rewards=rewards,
        group_ids=groups,
        gamma=spec.gate_gamma,
        mode=spec.gate_mode,
        temperature=spec.gate_temperature,
        success_threshold=spec.success_threshold,
    )
    plan = hpt_batch_plan(gate, groups)
    to_teacher = {g for g in plan.demo_groups if _routes_to_teacher(spec, prompts[g])}
    samples = []
    for sample, keep, weight in zip(rollouts, plan.keep_b.tolist(), plan.rl_weight_b.tolist()):
        if sample.group_id in to_teacher:
            sample.rl_weight, sample.sft_weight = 1.0, 0.0
            sample.metadata["route"] = TEACHER_ROUTE
            samples.append(sample)
        elif keep:
            sample.rl_weight, sample.sft_weight = float(weight), 0.0
            samples.append(sample)
    written = _teacher_demos(spec, prompts, plan.demo_groups, write_demos)
    sft_groups = rejected = 0
    for group, beta in zip(plan.demo_groups, plan.demo_sft_weight):
        if group in to_teacher:
            continue
        if group not in written:
            samples.append(demo_sample(prompts[group], group, sft_weight=float(beta), rl_weight=0))
            sft_groups += 1
            continue
        demo = written[group]
        if demo is None:  # the teacher's answer failed too: nothing to imitate
            rejected += 1
            continue
        prompt = dataclasses.replace(prompts[group], demo_ids=demo)
        sample = demo_sample(prompt, group, sft_weight=float(beta), rl_weight=0)
        sample.metadata["route"] = TEACHER_DEMO_ROUTE
        samples.append(sample)
    metrics = gate.metrics()
    num = max(1, len(prompts))
    if spec.needs_teacher:
        metrics["hpt/route_rl_share"] = float(gate.route_rl_g.sum()) / num
        metrics["hpt/route_sft_share"] = sft_groups / num
        metrics["hpt/route_teacher_share"] = len(to_teacher) / num
    if spec.needs_teacher_demos:
        metrics["hpt/route_teacher_demo_share"] = (len(written) - rejected) / num
        metrics["hpt/teacher_demos_rejected"] = float(rejected)
    return BatchPlan(samples, metrics)


def _teacher_demos(
    spec: AlgorithmSpec,
    prompts: list[PromptRecord],
    demo_groups: list[int],
    write_demos: DemoWriter | None,
) -> dict[int, list[int] | None]:
    """``teacher_route: generate``: the teacher's demonstration (or None) of each group that
    failed the gate without one of its own."""
    if not spec.needs_teacher_demos:
        return {}
    lacking = [g for g in demo_groups if prompts[g].demo_ids is None]
    if not lacking:
        return {}
    if write_demos is None:
        raise ValueError("teacher_route generate: no teacher was given to write demonstrations")
    demos = write_demos([prompts[g] for g in lacking])
    if len(demos) != len(lacking):
        raise RuntimeError(f"the teacher wrote {len(demos)} demonstrations for {len(lacking)}")
    return dict(zip(lacking, demos))


def _routes_to_teacher(spec: AlgorithmSpec, prompt: PromptRecord) -> bool:
    """HPT with a teacher: a prompt that fails the gate is trained with the distillation part on
    its own rollouts (route ``teacher``) when it has no demonstration, or always
    (``teacher_route: always``); otherwise with SFT on its demonstration."""
    if not spec.needs_teacher_logprobs or spec.teacher_route == "generate":
        return False
    return spec.teacher_route == "always" or prompt.demo_ids is None


def attach_advantages(spec: AlgorithmSpec, samples: list[Sample]) -> None:
    """Set each row's outcome advantage (the same for every token of a row) in place.

    Only rows in the RL term get one (group statistics over those rows); SFT-only rows and rows
    routed to the teacher get 0.
    """
    for sample in samples:
        sample.advantage = 0.0
    # Rows routed to the teacher get no outcome part (their signal is the distillation part).
    rl_rows = [s for s in samples if s.rl_weight != 0 and s.metadata.get("route") != TEACHER_ROUTE]
    if not rl_rows or spec.advantage == "gae":  # GAE: the trainer, from the critic's values
        return
    dense: dict[int, int] = {}
    groups_b = torch.tensor([dense.setdefault(s.group_id, len(dense)) for s in rl_rows])
    advantages_b1 = compute_advantages(
        spec.advantage,
        rewards=torch.tensor([float(s.reward or 0.0) for s in rl_rows]),
        group_ids=groups_b,
        response_mask=torch.ones(len(rl_rows), 1),
        is_demo=torch.tensor([s.is_demo for s in rl_rows]),
        **spec.advantage_options,
    )
    for sample, advantage in zip(rl_rows, advantages_b1[:, 0].tolist()):
        sample.advantage = float(advantage)
