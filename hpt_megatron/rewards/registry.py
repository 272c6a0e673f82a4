"""Reward registry: a config names a reward by registered name or ``package.module:function``.

Built-in names map to import paths, so checking a config does not import sympy. A reward function
is any callable ``(response: str, ground_truth: str) -> float``.
"""

from __future__ import annotations

import importlib
from typing import Protocol


class RewardFn(Protocol):
    def __call__(self, response: str, ground_truth: str) -> float: ...


_REGISTRY: dict[str, str] = {
    "math": "hpt_megatron.rewards.math_grader:math_reward",
    "multiple_choice": "hpt_megatron.rewards.multiple_choice:multiple_choice_reward",
    "gpqa": "hpt_megatron.rewards.multiple_choice:multiple_choice_reward",
    "arc_c": "hpt_megatron.rewards.multiple_choice:multiple_choice_reward",
}


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def import_path_of(spec: str) -> str:
    """The ``module:function`` path of a registered name or an import path."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown reward '{spec}': use one of {registered_rewards()} "
            "or 'package.module:function'"
        )
    return spec


def check_reward_spec(spec: str) -> None:
    """Raise ``ValueError`` unless ``spec`` names a usable reward (built-ins are not imported)."""
    if spec not in _REGISTRY:
        resolve_reward(spec)


def resolve_reward(spec: str) -> RewardFn:
    """Import and return the reward function named by ``spec``.

    Raises:
        ValueError: naming ``spec`` when it is unknown, cannot be imported or is not callable.
    """
    path = import_path_of(spec)
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward '{spec}': expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward '{spec}': cannot import module '{module_name}': {err}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"reward '{spec}': module '{module_name}' has no callable '{attr}'")
    return fn
