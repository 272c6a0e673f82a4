"""The clipped value loss and explained variance against hand-computed values."""

import pytest
import torch

from hpt_megatron.algorithms import explained_variance, value_loss


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
