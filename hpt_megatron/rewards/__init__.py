"""Rewards: the math grader, the multiple-choice grader, a registry and a grading pool.

``from hpt_megatron.rewards import math_reward`` gives ``math_reward(response, ground_truth)``;
:class:`RewardPool` grades many responses in worker processes with a per-answer timeout.
The graders import sympy, so they are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from hpt_megatron.rewards.pool import RewardPool, grade_batch
from hpt_megatron.rewards.registry import (
    RewardFn,
    registered_rewards,
    resolve_reward,
)

_LAZY = {
    "math_reward": "hpt_megatron.rewards.math_grader",
    "answers_match": "hpt_megatron.rewards.math_grader",
    "multiple_choice_reward": "hpt_megatron.rewards.multiple_choice",
    "last_boxed": "hpt_megatron.rewards.extract",
}

__all__ = [
    "RewardFn",
    "RewardPool",
    "grade_batch",
    "registered_rewards",
    "resolve_reward",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpt_megatron.rewards' has no attribute '{name}'")
