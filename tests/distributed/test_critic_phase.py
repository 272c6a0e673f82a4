"""The critic's phase of a PPO step through the trainer's own path (``critic_phase``,
``PolicyUpdate.update``) on hand-built rows, against hand computations:

- the critic starts as the policy's trunk with a zero head;
- the value of response token j is the critic's output at position ``prompt_len - 1 + j`` (the
  state before the token is emitted; the log-probs' shift), from a plain forward of the row alone;
- with gamma = lambda = 1, the returns are the outcome reward on every response token and 0
  elsewhere; the advantages are R - V_old whitened over the step's response tokens;
- ``critic/explained_variance`` is 1 - Var(R - V_old) / Var(R) over the response tokens, and
  ``critic/explained_variance_prompt_bound`` 1 when the prompt determines the reward;
- when the reward is a function of the prompt, the critic alone (its warm-up) learns it: the
  explained variance rises above 0.5 and both the trunk and the head move.
"""

import json
import pathlib

import pytest
import torch

from tests.distributed.launch import launch

WORKER = pathlib.Path(__file__).parent / "workers" / "critic_phase.py"
pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def phase(tmp_path_factory):
    out = tmp_path_factory.mktemp("critic_phase") / "phase.json"
    launch(WORKER, "--out", str(out), "--steps", "30", nproc=1)
    return json.loads(out.read_text())


def test_the_critic_starts_as_the_policy_trunk_with_a_zero_head(phase):
    assert phase["trunk_equal"] and phase["head_zero"]


def test_values_are_the_state_before_each_response_token(phase):
    for row in phase["rows"]:
        p, t = row["prompt_len"], row["response_len"]
        want = torch.tensor(row["plain"][p - 1 : p + t - 1])
        got = torch.tensor(row["values"])
        assert got.shape == (t,)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_returns_are_the_outcome_and_advantages_whitened_r_minus_v(phase):
    rows = phase["rows"]
    for row in rows:
        assert row["returns"] == [row["reward"]] * row["response_len"]
        assert row["returns_off_response"] == 0 and row["advantages_off_response"] == 0
    values = torch.tensor([v for row in rows for v in row["values"]], dtype=torch.float64)
    returns = torch.tensor([r for row in rows for r in row["returns"]], dtype=torch.float64)
    delta = returns - values
    want = (delta - delta.mean()) / (delta.var(unbiased=False).sqrt() + 1e-6)
    got = torch.tensor([a for row in rows for a in row["advantages"]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    ev = 1 - (returns - values).var(unbiased=False) / returns.var(unbiased=False)
    assert phase["metrics"]["critic/explained_variance"] == pytest.approx(float(ev), rel=1e-6)
    # The reward is a function of the prompt: a critic that sees only the prompt can explain all.
    assert phase["metrics"]["critic/explained_variance_prompt_bound"] == pytest.approx(1.0)


def test_the_critic_learns_a_value_the_prompt_determines(phase):
    curve = [c["critic/explained_variance"] for c in phase["curve"]]
    assert curve[0] < 0  # the random head explains nothing at first
    assert max(curve[-5:]) > 0.5, curve
    losses = [c["critic/value_loss"] for c in phase["curve"]]
    assert sum(losses[-5:]) < 0.2 * sum(losses[:5]), losses
    assert phase["moved"]["trunk"] > 1e-3 and phase["moved"]["head"] > 1e-3
