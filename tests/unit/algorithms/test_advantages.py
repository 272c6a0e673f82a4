"""Advantage estimators against hand-computed values, and their input errors."""

import math

import pytest
import torch

from hpt_megatron.algorithms import compute_advantages, fold_kl_into_rewards, gae

MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float32)
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0]
GROUPS = [0, 0, 0, 1, 1]


def per_row(adv_bt: torch.Tensor) -> list[float]:
    """The (constant) advantage of each row, checking it is zero off the response."""
    assert (adv_bt[MASK == 0] == 0).all()
    return adv_bt[:, 0].tolist()


def test_grpo_unbiased_std_with_eps():
    adv = compute_advantages("grpo", rewards=REWARDS, group_ids=GROUPS, response_mask=MASK)
    std0 = math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased, n - 1 = 2
    expected = [(2 / 3) / (std0 + 1e-6), (-1 / 3) / (std0 + 1e-6), (-1 / 3) / (std0 + 1e-6), 0, 0]
    assert per_row(adv) == pytest.approx(expected, rel=1e-6)
    biased = compute_advantages(
        "grpo", rewards=REWARDS, group_ids=GROUPS, response_mask=MASK, std_unbiased=False
    )
    assert per_row(biased)[0] == pytest.approx((2 / 3) / (math.sqrt(2 / 9) + 1e-6), rel=1e-6)
    assert (adv[1, :2] == adv[1, 0]).all()


def test_dr_grpo_and_rloo():
    dr = compute_advantages("dr_grpo", rewards=REWARDS, group_ids=GROUPS, response_mask=MASK)
    assert per_row(dr) == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0], abs=1e-6)
    rloo = compute_advantages("rloo", rewards=REWARDS, group_ids=GROUPS, response_mask=MASK)
    assert per_row(rloo) == pytest.approx([1.0, -0.5, -0.5, 0, 0], abs=1e-6)


def test_demos_excluded_from_grpo_stats_but_included_in_srft():
    rewards, groups = [1.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0, 1]
    demo = [False, False, False, True, True]
    with pytest.raises(ValueError, match="group 1 has 0 member"):
        compute_advantages(
            "grpo", rewards=rewards, group_ids=groups, response_mask=MASK, is_demo=demo
        )
    groups = [0, 0, 0, 0, 0]
    dr = compute_advantages(
        "dr_grpo", rewards=rewards, group_ids=groups, response_mask=MASK, is_demo=demo
    )
    assert per_row(dr) == pytest.approx([2 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3], abs=1e-6)
    srft = compute_advantages(
        "srft", rewards=rewards, group_ids=groups, response_mask=MASK, is_demo=demo
    )
    r = torch.tensor(rewards, dtype=torch.float64)
    expected = ((r - r.mean()) / (r.std() + 1e-6)).tolist()
    assert per_row(srft) == pytest.approx(expected, rel=1e-5)


def test_one_and_reinforce():
    assert torch.equal(compute_advantages("one", rewards=None, response_mask=MASK), MASK)
    adv = compute_advantages("reinforce", rewards=[1, 0, -1, 0.5, 0], response_mask=MASK)
    assert per_row(adv) == [1, -1, -1, 1, -1]


def test_reinforce_pp_whitens_token_returns_over_the_batch():
    adv = compute_advantages("reinforce_pp", rewards=REWARDS, response_mask=MASK)
    tokens = torch.tensor(REWARDS, dtype=torch.float64)[:, None].expand(5, 3)[MASK.bool()]
    mean, std = tokens.mean(), tokens.std(unbiased=False)
    expected = ((torch.tensor(REWARDS, dtype=torch.float64) - mean) / (std + 1e-6)).tolist()
    assert per_row(adv) == pytest.approx(expected, rel=1e-5)


def test_gae_closed_form():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.7, 9.0]])
    # lambda = 1, gamma = 1: A_t = R - V_t (Monte-Carlo return minus value)
    adv, ret = gae(rewards=[1.0], response_mask=mask, values=values)
    torch.testing.assert_close(adv.float(), torch.tensor([[0.5, 0.8, 0.3, 0.0]]))
    torch.testing.assert_close(ret.float(), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # lambda = 0: A_t = r_t + gamma V_{t+1} - V_t
    adv0, _ = gae(rewards=[1.0], response_mask=mask, values=values, gamma=0.9, lam=0.0)
    expected = torch.tensor([[0.9 * 0.2 - 0.5, 0.9 * 0.7 - 0.2, 1.0 - 0.7, 0.0]])
    torch.testing.assert_close(adv0.float(), expected)
    dones = torch.tensor([[False, True, False, False]])
    adv_d, _ = gae(rewards=[1.0], response_mask=mask, values=values, dones=dones)
    assert adv_d[0, 1].item() == pytest.approx(-0.2)  # no bootstrap past a done
    whitened = compute_advantages("gae", rewards=[1.0], response_mask=mask, values=values)
    assert whitened[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)


def test_fold_kl_into_rewards():
    kl = torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = fold_kl_into_rewards(rewards=[1.0, 0.0], kl=kl, response_mask=mask, coef=0.5)
    assert out.tolist() == pytest.approx([1.0 - 0.3, -1.0])


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo", "srft"])
def test_singleton_group_is_a_clear_error(kind):
    with pytest.raises(ValueError, match="group 7 has 1 member"):
        compute_advantages(
            kind, rewards=[1.0, 0.0, 1.0], group_ids=[3, 3, 7], response_mask=MASK[:3]
        )


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        compute_advantages(
            "grpo", rewards=[1.0, float("nan"), 0.0, 1.0, 0.0], group_ids=GROUPS, response_mask=MASK
        )
    with pytest.raises(ValueError, match="expected 5 entries"):
        compute_advantages("grpo", rewards=REWARDS[:4], group_ids=GROUPS, response_mask=MASK)
    with pytest.raises(ValueError, match="group_ids: expected 5"):
        compute_advantages("grpo", rewards=REWARDS, group_ids=GROUPS[:3], response_mask=MASK)
    with pytest.raises(ValueError, match="unknown advantage"):
        compute_advantages("gpro", rewards=REWARDS, group_ids=GROUPS, response_mask=MASK)
    with pytest.raises(ValueError, match="do not apply"):
        compute_advantages("grpo", rewards=REWARDS, group_ids=GROUPS, response_mask=MASK, lam=1)
    with pytest.raises(ValueError, match="needs a group id"):
        compute_advantages("grpo", rewards=REWARDS, response_mask=MASK)
    with pytest.raises(ValueError, match="response_mask"):
        compute_advantages("grpo", rewards=REWARDS, group_ids=GROUPS, response_mask=MASK[0])
    with pytest.raises(ValueError, match="values"):
        gae(rewards=[1.0], response_mask=MASK[:1], values=torch.zeros(1, 4))


def test_kl_penalised_advantages_fold_the_kl_into_the_rewards():
    from hpt_megatron.algorithms import kl_penalised_advantages

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.3, 9.0], [0.2, 0.0, 0.4], [0.5, 9.0, 9.0], [0.0, 0.0, 9.0]])
    rewards, groups = [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1]
    # Outcome kinds: each row's reward minus coef x its summed KL (padding ignored), then RLOO.
    got = kl_penalised_advantages(
        "rloo", rewards=rewards, kl=kl, coef=0.5, response_mask=mask, group_ids=groups
    )
    folded = [1.0 - 0.5 * 0.4, 0.0 - 0.5 * 0.6, 1.0 - 0.5 * 0.5, 1.0]
    want = [folded[0] - folded[1], folded[1] - folded[0], folded[2] - folded[3]]
    want.append(-want[2])
    assert got[:, 0].tolist() == pytest.approx(want)
    assert (got * (1 - mask)).abs().max() == 0
    # Token kinds: -coef x KL per token in the returns (REINFORCE++, gamma 1, whitened).
    got_pp = kl_penalised_advantages(
        "reinforce_pp", rewards=rewards, kl=kl, coef=0.5, response_mask=mask
    )
    token_rewards = -0.5 * kl * mask
    want_pp = compute_advantages(
        "reinforce_pp", rewards=rewards, response_mask=mask, token_rewards=token_rewards
    )
    assert torch.allclose(got_pp, want_pp)
    # Row 0: returns-to-go 1 - 0.05 - 0.15 then 1 - 0.15 differ, so the KL reached each token.
    assert got_pp[0, 0] < got_pp[0, 1]
