"""The HPT gate: routing by success rate, gamma as a count or a fraction, soft gates, plan."""

import pytest
import torch

from hpt_megatron.algorithms import hpt_batch_plan, hpt_gate, hpt_route

# 9 groups of 8 rollouts; group k has exactly k correct responses (k = 0..8)
N = 8
GROUP_IDS = [g for g in range(9) for _ in range(N)]
REWARDS = [1.0 if i < g else 0.0 for g in range(9) for i in range(N)]


def sft_groups(gamma) -> set[int]:
    route = hpt_route(rewards=REWARDS, group_ids=GROUP_IDS, gamma=gamma)
    return {g for g, rl in route.items() if not rl}


def test_gamma_zero_routes_exactly_the_all_wrong_groups_to_sft():
    assert sft_groups(0) == {0}
    assert sft_groups(0.0) == {0}


@pytest.mark.parametrize("gamma", ["2/8", 0.25, 2])
def test_gamma_two_of_eight(gamma):
    assert sft_groups(gamma) == {0, 1, 2}


def test_count_and_fraction_differ_for_one():
    assert sft_groups(1) == {0, 1}  # int: a count of correct responses
    assert sft_groups(1.0) == set(range(9))  # float: a fraction; P > 1 never holds


def test_route_is_one_bool_per_group():
    route = hpt_route(rewards=REWARDS, group_ids=GROUP_IDS, gamma=0)
    assert list(route) == list(range(9)) and all(isinstance(v, bool) for v in route.values())


def test_metrics_sft_fraction_and_histogram():
    gate = hpt_gate(rewards=REWARDS, group_ids=GROUP_IDS, gamma="2/8")
    m = gate.metrics()
    assert m["gate/sft_fraction"] == pytest.approx(3 / 9)
    assert m["gate/success_rate"] == pytest.approx(sum(range(9)) / 72)
    assert m["gate/p_hist/0_of_8"] == 1.0 and m["gate/p_hist/8_of_8"] == 1.0
    assert sum(v for k, v in m.items() if "p_hist" in k) == 9


def test_soft_gates_are_opt_in():
    hard = hpt_gate(rewards=REWARDS, group_ids=GROUP_IDS, gamma=0)
    assert set(hard.alpha_g.tolist()) == {0.0, 1.0}
    linear = hpt_gate(rewards=REWARDS, group_ids=GROUP_IDS, gamma=0, mode="linear")
    torch.testing.assert_close(linear.alpha_g, torch.arange(9, dtype=torch.float64) / 8)
    torch.testing.assert_close(linear.beta_g, 1 - linear.alpha_g)
    sig = hpt_gate(rewards=REWARDS, group_ids=GROUP_IDS, gamma=0.5, mode="sigmoid")
    assert sig.alpha_g[4].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mode"):
        hpt_gate(rewards=REWARDS, group_ids=GROUP_IDS, gamma=0, mode="cosine")


def test_batch_plan_drops_sft_rollouts_and_adds_demos():
    gate = hpt_gate(rewards=REWARDS, group_ids=GROUP_IDS, gamma=2)
    plan = hpt_batch_plan(gate, GROUP_IDS)
    groups = torch.tensor(GROUP_IDS)
    assert plan.keep_b.tolist() == (groups > 2).tolist()
    assert plan.demo_groups == [0, 1, 2] and plan.demo_sft_weight == [1.0, 1.0, 1.0]
    assert plan.rl_weight_b[plan.keep_b].eq(1).all()
    with pytest.raises(ValueError, match="not graded"):
        hpt_batch_plan(gate, [99])


def test_bad_gamma_and_nan_rewards():
    with pytest.raises(ValueError, match="gamma"):
        hpt_route(rewards=REWARDS, group_ids=GROUP_IDS, gamma=1.5)
    with pytest.raises(ValueError, match="gamma"):
        hpt_route(rewards=REWARDS, group_ids=GROUP_IDS, gamma=-1)
    with pytest.raises(ValueError, match="gamma"):
        hpt_route(rewards=REWARDS, group_ids=GROUP_IDS, gamma="two/8")
    bad = list(REWARDS)
    bad[5] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[5\]"):
        hpt_route(rewards=bad, group_ids=GROUP_IDS, gamma=0)
    with pytest.raises(ValueError, match="group_ids"):
        hpt_route(rewards=REWARDS, group_ids=GROUP_IDS[:-1], gamma=0)
