"""The clipped value loss, explained variance and the prompt-only explained-variance bound against
hand-computed values."""

import pytest
import torch

from hpt_megatron.algorithms import (
    explained_variance,
    prompt_explained_variance_bound,
    value_loss,
)


def test_clipped_value_loss_closed_form():
    values = torch.tensor([[1.0, 0.5, 9.0], [0.0, -1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.4, 0.0], [0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0], [1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss, metrics = value_loss(
        values=values,
        old_values=old,
        returns=returns,
        response_mask=mask,
        cliprange_value=0.2,
        num_tokens=8,
    )
    # token 0: v=1 (clip 0.2): max(1, 3.24) = 3.24 (clipped); token 1: v=.5 (clip .5): .25 each
    # token 3: v=0: 1 each; token 4: v=-1 (clip -0.2): max(0, 0.64) = 0.64 (clipped)
    assert float(loss) == pytest.approx(0.5 * (3.24 + 0.25 + 1 + 0.64) / 8)
    assert float(metrics["value_clip_frac"]) == pytest.approx(2 / 8)
    assert float(metrics["value_mean"]) == pytest.approx((1 + 0.5 - 1) / 8)
    loss.backward()
    # Clipped tokens pass no gradient to V; the others 0.5 * 2 (v - R) / 8.
    want = torch.tensor([[0.0, 0.5 / 8, 0.0], [-1.0 / 8, 0.0, 0.0]])
    assert torch.allclose(values.grad, want)
    unclipped, _ = value_loss(
        values=values,
        old_values=old,
        returns=returns,
        response_mask=mask,
        cliprange_value=None,
        num_tokens=8,
    )
    assert float(unclipped) == pytest.approx(0.5 * (1 + 0.25 + 1 + 0) / 8)


def test_explained_variance():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    returns = torch.tensor([[1.0, 2.0, 50.0], [3.0, 4.0, 5.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 3.0), returns, mask) == pytest.approx(0.0)
    noisy = returns + torch.tensor([[1.0, -1.0, 0.0], [1.0, -1.0, 0.0]])
    assert explained_variance(noisy, returns, mask) == pytest.approx(1 - 0.8 / 2.0)


def test_prompt_bound_closed_forms():
    # Each prompt's outcome is certain: the prompt explains everything.
    assert prompt_explained_variance_bound([1, 1, 0, 0], [0, 0, 1, 1]) == pytest.approx(1.0)
    # Both prompts alike: within-prompt variance (unbiased, 1/2 each) over Var(R) = 1/4.
    assert prompt_explained_variance_bound([1, 0, 1, 0], [0, 0, 1, 1]) == pytest.approx(-1.0)
    # Token weights: g0 = [1, 1] (2 tokens each), g1 = [1, 0] (1 and 3 tokens): weighted mean
    # 5/8, Var 120/512; within: (0 * 4 + 1/2 * 4) / 8.
    got = prompt_explained_variance_bound([1, 1, 1, 0], [0, 0, 1, 1], lengths=[2, 2, 1, 3])
    assert got == pytest.approx(1 - 0.25 / (120 / 512))
    # A lone member says nothing about its prompt's variance: left out, or None if all are.
    assert prompt_explained_variance_bound([1, 1, 0, 0, 1], [0, 0, 1, 1, 2]) == pytest.approx(1.0)
    assert prompt_explained_variance_bound([1, 0], [0, 1]) is None
    assert prompt_explained_variance_bound([1, 1], [0, 0]) == 0.0  # no variance to explain


def test_prompt_bound_is_the_explained_variance_of_the_true_success_rates():
    """The estimate from the rewards equals, up to sampling noise, ``explained_variance`` of a
    critic whose value on every token is the prompt's true success rate."""
    gen = torch.Generator().manual_seed(0)
    groups, n = 2000, 8
    p_g = torch.rand(groups, generator=gen) ** 2
    group_b = torch.arange(groups).repeat_interleave(n)
    rewards_b = torch.bernoulli(p_g[group_b], generator=gen)
    lengths_b = torch.randint(1, 6, (groups * n,), generator=gen)
    mask_bt = (torch.arange(5)[None] < lengths_b[:, None]).double()
    returns_bt = rewards_b[:, None] * mask_bt
    values_bt = p_g[group_b][:, None] * mask_bt
    want = explained_variance(values_bt, returns_bt, mask_bt)
    got = prompt_explained_variance_bound(rewards_b, group_b, lengths=lengths_b)
    assert got == pytest.approx(want, abs=0.02)
    # Var(p) / Var(R) = (E[p^2] - E[p]^2) / (E[p] - E[p]^2) = (1/5 - 1/9) / (1/3 - 1/9) = 0.4
    assert want == pytest.approx(0.4, abs=0.03)
