"""LUFFY's group as the official code builds it: n - 1 generations + 1 demonstration.

Unify-Post-Training exp_scripts/train_luffy.sh:63,87-89 runs ``rollout.n=8``, ``n_prefix=1``,
``min_prefix_ratio = max_prefix_ratio = 1.0``; hpt/verl/verl/mix_src/mix_vllm_rollout.py:
187-204 gives the first ``n_prefix`` of each prompt's n samples the prefix ratio and the other
``n - n_prefix`` ratio 0.0, and line 227 cuts ``int(len(target) * ratio)`` tokens of the
demonstration: per prompt, 1 whole demonstration and 8 - 1 = 7 generations, all in one group
(one uid) for the advantage.
"""

from __future__ import annotations

import pytest

from hpt_megatron.config import load_config
from hpt_megatron.config.presets import get_preset
from hpt_megatron.data.records import PromptRecord
from hpt_megatron.data.sample import Sample
from hpt_megatron.orchestration.batch_rules import apply_batch_rule, rollouts_per_prompt

BASE = ["model.inline={hidden_size: 8}"]


def _official_group(n: int, n_prefix: int, prefix_ratio: float) -> tuple[int, int]:
    """(generations, whole demonstrations) per prompt, from mix_vllm_rollout.py:187-227."""
    ratios = [prefix_ratio] * n_prefix + [0.0] * (n - n_prefix)
    target_len = 100
    cut = [int(target_len * r) for r in ratios]
    return sum(c == 0 for c in cut), sum(c == target_len for c in cut)


def test_luffy_generates_n_minus_one_and_adds_one_demonstration():
    spec = get_preset("luffy")
    generated, demos = _official_group(8, 1, 1.0)
    assert (generated, demos) == (7, 1)
    assert rollouts_per_prompt(spec, 8) == generated
    prompts = [
        PromptRecord(
            prompt_id=str(g),
            prompt_ids=[1, 2],
            prompt_text="q",
            ground_truth="1",
            data_source="t",
            demo_ids=[3, 4, 5],
        )
        for g in range(2)
    ]
    rollouts = [
        Sample(prompt_id=str(g), group_id=g, prompt_ids=[1, 2], response_ids=[6], reward=0.0)
        for g in range(2)
        for _ in range(rollouts_per_prompt(spec, 8))
    ]
    plan = apply_batch_rule(spec, prompts, rollouts)
    for g in range(2):
        group = [s for s in plan.samples if s.group_id == g]
        assert len(group) == 8
        assert sum(s.is_demo for s in group) == demos


def test_the_option_keeps_n_plus_one():
    spec = get_preset("luffy").with_options(demos_replace_rollouts=False)
    assert rollouts_per_prompt(spec, 8) == 8


@pytest.mark.parametrize("name", ["grpo", "srft", "hpt", "hpt_paper", "dapo"])
def test_other_presets_generate_n(name):
    assert rollouts_per_prompt(get_preset(name), 8) == 8


def test_a_group_with_no_room_for_a_rollout_is_a_config_error():
    with pytest.raises(ValueError, match="rollout.n: 1 leaves no rollout"):
        load_config(None, [*BASE, "algorithm.preset=luffy", "rollout.n=1"])
    kept = load_config(
        None,
        [
            *BASE,
            "algorithm.preset=luffy",
            "rollout.n=1",
            "algorithm.options.demos_replace_rollouts=false",
        ],
    )
    assert kept.rollout.n == 1
