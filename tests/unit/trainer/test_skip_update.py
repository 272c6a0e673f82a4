"""Updates skipped for their gradient norm, as the official HPT actor skips them.

Unify-Post-Training, hpt/verl/verl/mix_src/mix_actor.py:497-513: the total norm that
``clip_grad_norm_`` returns (before clipping) is checked; a non-finite norm, or one strictly
above ``max_grad_norm`` (exp_scripts/train.sh:30,66: 80 for the 7B and 1.5B runs), zeroes the
gradients instead of stepping; an unset (or 0) ``max_grad_norm`` checks only finiteness.
"""

from __future__ import annotations

import math

import pytest
import torch

from hpt_megatron.config import load_config
from hpt_megatron.config.presets import get_preset
from hpt_megatron.data.sample import Sample
from hpt_megatron.trainer.batching import MicroBatch
from hpt_megatron.trainer.engine import StepResult, skips_update
from hpt_megatron.trainer.update import PolicyUpdate, UpdateLayout


def _official(grad_norm: float, max_grad_norm: float | None) -> bool:
    """mix_actor.py:506-513 as a predicate: True where the optimizer does not step."""
    if not math.isfinite(grad_norm):
        return True
    return bool(max_grad_norm) and grad_norm > max_grad_norm


@pytest.mark.parametrize("norm", [0.0, 1.0, 79.99, 80.0, 80.01, 1e6, math.inf, math.nan])
@pytest.mark.parametrize("limit", [80.0, None])
def test_the_skip_rule_is_the_official_one(norm, limit):
    assert skips_update(norm, limit) == _official(norm, limit)


def test_eighty_steps_and_just_above_skips():
    assert not skips_update(80.0, 80.0) and skips_update(80.0001, 80.0)


class CountingEngine:
    """Steps nothing; reports the given gradient norms in turn and skips per ``skips_update``."""

    def __init__(self, norms: list[float], limit: float | None) -> None:
        self.norms = list(norms)
        self.limit = limit

    def forward_logprobs(self, microbatches: list[MicroBatch]) -> list:
        return [
            (torch.zeros(mb.targets_bs.shape), torch.zeros(mb.targets_bs.shape))
            for mb in microbatches
        ]

    def train_step(self, microbatches: list[MicroBatch], loss_fn) -> StepResult:
        norm = self.norms.pop(0)
        return StepResult(
            grad_norm=norm, skipped=skips_update(norm, self.limit), lr=0.0, metrics={"loss": 0.0}
        )


def _batch() -> list[Sample]:
    return [
        Sample(
            prompt_id=str(g),
            group_id=g,
            prompt_ids=[3, 4],
            response_ids=[5, 6, 7],
            advantage=0.5 - i,
            rl_weight=1.0,
        )
        for g in range(4)
        for i in range(2)
    ]


@pytest.mark.parametrize(
    ("norms", "expected"), [([10.0, 90.0], 1.0), ([90.0, 95.0], 2.0), ([1.0, 2.0], 0.0)]
)
def test_the_step_counts_its_skipped_updates(norms, expected):
    engine = CountingEngine(norms, limit=80.0)
    update = PolicyUpdate(engine, UpdateLayout(mini_batches=2))
    metrics = update.update(_batch(), get_preset("grpo"))
    assert metrics["train/skipped_updates"] == expected
    assert metrics["train/skipped_update"] == float(norms[-1] > 80.0)  # the last update's


def test_a_limit_at_or_below_zero_is_a_config_error():
    with pytest.raises(ValueError, match="skip_update_grad_norm: must be > 0"):
        load_config(None, ["model.inline={hidden_size: 8}", "trainer.skip_update_grad_norm=0"])
