"""The teacher's servers' scores (``algorithm.teacher.urls``) travel with the samples into the
micro-batches, and ``attach_teacher`` adds the distillation part from them to the RL tokens."""

from __future__ import annotations

import types

import pytest
import torch

from hpt_megatron.config.presets import get_preset
from hpt_megatron.data.sample import TEACHER_ROUTE, Sample
from hpt_megatron.trainer.batching import collate
from hpt_megatron.trainer.teacher import attach_teacher


def test_scores_from_the_samples_make_the_distillation_part():
    rows = [
        Sample(prompt_id="a", group_id=0, prompt_ids=[1, 2], response_ids=[3, 4],
               teacher_logprobs=[-1.0, -2.0], advantage=0.5),
        Sample(prompt_id="b", group_id=1, prompt_ids=[1], response_ids=[5, 6, 7],
               teacher_logprobs=[-0.5, -0.5, -0.5], metadata={"route": TEACHER_ROUTE}),
        Sample(prompt_id="c", group_id=2, prompt_ids=[1], response_ids=[8], is_demo=True,
               rl_weight=0.0, sft_weight=1.0),
    ]  # fmt: skip
    mb = collate(rows, [0, 1, 2])
    assert mb.teacher_logprobs_bs is not None
    mb.old_logprobs_bs = -0.25 * mb.loss_mask_bs  # pi_old
    ctx = types.SimpleNamespace(world_size=1, is_last_stage=True, tp_rank=0)
    spec = get_preset("grpo").with_options(distill_coef=2.0)
    metrics = attach_teacher(ctx, None, spec, [rows], [[mb]], [True])  # type: ignore[arg-type]
    mask = mb.loss_mask_bs.bool()
    assert mb.advantages_bs[0][mask[0]].tolist() == pytest.approx([0.5 - 1.5, 0.5 - 3.5])
    assert mb.advantages_bs[1][mask[1]].tolist() == pytest.approx([-0.5] * 3)
    assert mb.advantages_bs[2][mask[2]].tolist() == [0.0]  # the demonstration: no part
    assert metrics["teacher/kl_rl_mean"] == pytest.approx((0.75 + 1.75) / 2)
    assert metrics["teacher/kl_rl_max"] == pytest.approx(1.75)
    assert metrics["teacher/kl_distill_mean"] == pytest.approx(0.25)
    demos = collate([rows[2]], [0])  # only SFT rows: nothing to score, nothing added
    demos.old_logprobs_bs = torch.zeros_like(demos.loss_mask_bs)
    assert attach_teacher(ctx, None, spec, [[rows[2]]], [[demos]], [True]) == {}  # type: ignore[arg-type]
    unscored = Sample(prompt_id="d", group_id=3, prompt_ids=[1], response_ids=[9])
    bare = collate([unscored], [0])
    bare.old_logprobs_bs = torch.zeros_like(bare.loss_mask_bs)
    with pytest.raises(ValueError, match="teacher log-probs"):
        attach_teacher(ctx, None, spec, [[unscored]], [[bare]], [True])  # type: ignore[arg-type]
