"""HPT with a teacher: prompts that fail the gate without a demonstration (or all of them, with
``teacher_route: always``) keep their rollouts, routed to the teacher, with no outcome advantage;
the others go to RL or SFT as without a teacher, and the routes are counted."""

from __future__ import annotations

import pytest

from hpt_megatron.config.presets import get_preset
from hpt_megatron.data.records import PromptRecord
from hpt_megatron.data.sample import TEACHER_DEMO_ROUTE, TEACHER_ROUTE, Sample
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


@pytest.mark.parametrize("distill_coef", [0.0, 1.0])
def test_the_teacher_writes_the_missing_demonstration(distill_coef):
    """``teacher_route: generate``: the prompt that fails without a demonstration gets the
    teacher's, trained with SFT and marked; the one with its own keeps it; the writer is asked
    for the lacking prompt only. With the distillation part on too, it still gets a
    demonstration rather than the distillation route."""
    spec = get_preset("hpt").with_options(teacher_route="generate", distill_coef=distill_coef)
    prompts, rollouts = _batch()
    asked = []

    def write(lacking):
        asked.extend(p.prompt_id for p in lacking)
        return [[9, 8, 2]]

    plan = apply_batch_rule(spec, prompts, rollouts, write)
    assert asked == ["2"]
    demos = {s.group_id: s for s in plan.samples if s.is_demo}
    assert sorted(demos) == [1, 2]
    assert demos[1].response_ids == [3, 4, 5] and "route" not in demos[1].metadata
    assert demos[2].response_ids == [9, 8, 2] and demos[2].metadata["route"] == TEACHER_DEMO_ROUTE
    assert (demos[2].sft_weight, demos[2].rl_weight) == (1.0, 0)
    assert not any(s.metadata.get("route") == TEACHER_ROUTE for s in plan.samples)
    assert plan.metrics["hpt/route_teacher_demo_share"] == pytest.approx(1 / 3)
    assert plan.metrics["hpt/route_sft_share"] == pytest.approx(1 / 3)
    assert plan.metrics["hpt/route_teacher_share"] == 0.0
    assert plan.metrics["hpt/teacher_demos_rejected"] == 0.0


def test_a_demonstration_the_teacher_got_wrong_is_not_trained():
    spec = get_preset("hpt").with_options(teacher_route="generate")
    prompts, rollouts = _batch()
    plan = apply_batch_rule(spec, prompts, rollouts, lambda lacking: [None] * len(lacking))
    assert {s.group_id for s in plan.samples if s.is_demo} == {1}
    assert not any(s.group_id == 2 for s in plan.samples)  # its failed rollouts are dropped too
    assert plan.metrics["hpt/teacher_demos_rejected"] == 1.0
    assert plan.metrics["hpt/route_teacher_demo_share"] == 0.0


def test_teacher_routes_outside_the_gate_or_without_their_part_are_config_errors():
    from hpt_megatron.config.algorithm_spec import OptionError

    with pytest.raises(OptionError, match="teacher_route.*not 'hpt_gate'"):
        get_preset("grpo").with_options(teacher_route="generate")
    with pytest.raises(OptionError, match="'always' routes prompts to the distillation part"):
        get_preset("hpt").with_options(teacher_route="always")
