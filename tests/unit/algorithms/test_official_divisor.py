"""``hpt_paper``'s RL divisor is the run's response budget, as in the official code.

Unify-Post-Training (TsinghuaC3I) runs ``compute_policy_loss`` with
``loss_remove_token_mean=True`` (exp_scripts/train.sh:108): ``pg_loss = (pg_losses *
eos_mask).sum() / eos_mask.shape[-1]`` (hpt/verl/verl/trainer/ppo/core_algos.py:316-317), where
``pg_losses = -A * ratio`` without clipping (``loss_remove_clip=True``, core_algos.py:311-315)
and the response tensor is padded to ``response_length = data.max_response_length``
(hpt/verl/verl/mix_src/mix_vllm_rollout.py:293-295). The closed forms below are that arithmetic
by hand, for a budget of 64 tokens (the miniature's) and of 8192 (the released runs').
"""

import pytest
import torch

from hpt_megatron.algorithms import policy_loss
from hpt_megatron.config import load_config
from hpt_megatron.config.algorithm_spec import RELEASED_RESPONSE_BUDGET
from hpt_megatron.config.base import to_dict
from hpt_megatron.config.presets import get_preset

HPT_PAPER = ["model.inline={hidden_size: 8}", "algorithm.preset=hpt_paper"]


def _official_pg_loss(adv_b, ratio_bt, mask_bt, padded_width):
    """core_algos.py:307-317 with loss_remove_clip and loss_remove_token_mean: a plain loop."""
    total = 0.0
    for b in range(len(mask_bt)):
        for t in range(len(mask_bt[b])):
            total += -adv_b[b] * ratio_bt[b][t] * mask_bt[b][t]
    return total / padded_width


@pytest.mark.parametrize("budget", [64, 8192])
def test_hpt_paper_divides_by_the_runs_response_budget(budget):
    cfg = load_config(None, [*HPT_PAPER, f"data.max_response_tokens={budget}"])
    spec = cfg.algorithm.spec()
    assert spec.loss_agg_constant == budget
    # Two on-policy rows of one group (rewards 1, 0: group-mean advantages +0.5, -0.5), ratio 1
    # (one update per batch), lengths 3 and 2.
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-0.3, -0.7, -9.0]], dtype=torch.float64)
    logprobs.requires_grad_()
    adv = torch.tensor([0.5, -0.5], dtype=torch.float64)
    loss, _ = policy_loss(
        spec.with_options(entropy_coef=0.0),
        logprobs=logprobs,
        old_logprobs=logprobs.detach(),
        advantages=adv[:, None] * mask,
        response_mask=mask,
    )
    ones = [[1.0] * 3, [1.0] * 3]
    expected = _official_pg_loss([0.5, -0.5], ones, mask.tolist(), budget)
    # 3 tokens at -0.5 and 2 at +0.5: (-1.5 + 1.0) / budget
    assert expected == pytest.approx(-0.5 / budget)
    torch.testing.assert_close(loss.detach(), torch.tensor(expected, dtype=torch.float64))
    loss.backward()  # d/d log pi of -A * exp(log pi - old) at ratio 1: -A / budget
    torch.testing.assert_close(logprobs.grad, -adv[:, None] * mask / budget)


def test_an_explicit_constant_wins_over_the_budget():
    cfg = load_config(
        None,
        [*HPT_PAPER, "data.max_response_tokens=64", "algorithm.options.loss_agg_constant=8192"],
    )
    assert cfg.algorithm.spec().loss_agg_constant == 8192


def test_other_presets_keep_their_constant():
    cfg = load_config(
        None, [*HPT_PAPER[:1], "algorithm.preset=dr_grpo", "data.max_response_tokens=64"]
    )
    assert cfg.algorithm.spec().loss_agg_constant == 8192


def test_without_a_run_the_released_budget_is_used():
    spec = get_preset("hpt_paper")
    assert spec.loss_agg_constant is None
    assert spec.agg_constant == RELEASED_RESPONSE_BUDGET == 8192


def test_the_bound_budget_is_not_a_config_key():
    cfg = load_config(None, [*HPT_PAPER, "data.max_response_tokens=64"])
    dumped = to_dict(cfg)
    assert "response_budget" not in dumped["algorithm"]
    assert "loss_agg_constant" not in dumped["algorithm"]["options"]


def test_a_bad_constant_is_a_config_error():
    with pytest.raises(ValueError, match="loss_agg_constant: must be > 0"):
        load_config(None, [*HPT_PAPER, "algorithm.options.loss_agg_constant=0"])
