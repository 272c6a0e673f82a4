"""HPT with a teacher: prompts that fail the gate without a demonstration (or all of them, with
``teacher_route: always``) keep their rollouts, routed to the teacher, with no outcome advantage;
the others go to RL or SFT as without a teacher, and the routes are counted."""

from __future__ import annotations

import pytest

from hpt_megatron.config.presets import get_preset
from hpt_megatron.data.records import PromptRecord
from hpt_megatron.data.sample import TEACHER_ROUTE, Sample
from hpt_megatron.orchestration.batch_rules import apply_batch_rule, attach_advantages

# group 0 passes (2 of 4 correct); groups 1 (with a demonstration) and 2 (without) fail
REWARDS = {0: [1.0, 0.0, 1.0, 0.0], 1: [0.0] * 4, 2: [0.0] * 4}


def _batch() -> tuple[list[PromptRecord], list[Sample]]:
    prompts = [
        PromptRecord(
            prompt_id=str(g),
            prompt_ids=[1, 2],
            prompt_text="q",
            ground_truth="1",
            data_source="t",
            demo_ids=None if g == 2 else [3, 4, 5],
        )
        for g in REWARDS
    ]
    rollouts = [
        Sample(prompt_id=str(g), group_id=g, prompt_ids=[1, 2], response_ids=[6, 7], reward=r)
        for g, rewards in REWARDS.items()
        for r in rewards
    ]
    return prompts, rollouts


@pytest.mark.parametrize(
    ("route", "teacher_groups", "sft_groups"), [("no_demo", {2}, {1}), ("always", {1, 2}, set())]
)
def test_failing_prompts_go_to_the_teacher(route, teacher_groups, sft_groups):
    spec = get_preset("hpt").with_options(distill_coef=1.0, teacher_route=route)
    prompts, rollouts = _batch()
    plan = apply_batch_rule(spec, prompts, rollouts)
    attach_advantages(spec, plan.samples)
    routed = {s.group_id for s in plan.samples if s.metadata.get("route") == TEACHER_ROUTE}
    assert routed == teacher_groups
    assert {s.group_id for s in plan.samples if s.is_demo} == sft_groups
    for s in plan.samples:
        if s.group_id in teacher_groups:
            assert (s.rl_weight, s.sft_weight, s.advantage, s.is_demo) == (1.0, 0.0, 0.0, False)
    rl = [s.advantage for s in plan.samples if s.group_id == 0]
    assert rl == pytest.approx([0.5, -0.5, 0.5, -0.5])  # dr_grpo of the passing group
    shares = {k: plan.metrics[f"hpt/route_{k}_share"] for k in ("rl", "sft", "teacher")}
    assert shares == pytest.approx(
        {"rl": 1 / 3, "sft": len(sft_groups) / 3, "teacher": len(teacher_groups) / 3}
    )


def test_without_a_teacher_a_failing_prompt_needs_a_demonstration():
    prompts, rollouts = _batch()
    with pytest.raises(ValueError, match="prompt 2: the preset needs a demonstration"):
        apply_batch_rule(get_preset("hpt"), prompts, rollouts)
