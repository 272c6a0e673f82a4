"""The four parts in isolation: clip band, CISPO weight, constant-1 denominator, KL, TIS."""

import pytest
import torch

from hpt_megatron.algorithms import kl_estimate, policy_loss
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.config.presets import get_preset

# one row, four tokens: (A > 0, r above), (A > 0, r below), (A < 0, r above), (A < 0, r below)
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
RATIO = torch.tensor([[1.5, 0.5, 1.5, 0.5]], dtype=torch.float64)
MASK = torch.ones(1, 4, dtype=torch.float64)


def _grad(spec, ratio=RATIO, adv=ADV):
    logprobs = torch.full((1, 4), -1.0, dtype=torch.float64, requires_grad=True)
    old = logprobs.detach() - torch.log(ratio)
    loss, metrics = policy_loss(
        spec, logprobs=logprobs, old_logprobs=old, advantages=adv, response_mask=MASK
    )
    loss.backward()
    return logprobs.grad, metrics


def test_ppo_clip_zeroes_exactly_the_side_sign_A_selects():
    grad, metrics = _grad(get_preset("ppo"))
    # A > 0 & r > 1.2 and A < 0 & r < 0.8: exactly zero; the other two keep -A * r / N.
    assert grad[0, 0].item() == 0.0 and grad[0, 3].item() == 0.0
    torch.testing.assert_close(grad[0, 1], torch.tensor(-1.0 * 0.5 / 4, dtype=torch.float64))
    torch.testing.assert_close(grad[0, 2], torch.tensor(1.0 * 1.5 / 4, dtype=torch.float64))
    assert metrics["clip_frac"].item() == pytest.approx(0.5)


def test_clip_inside_band_is_untouched():
    ratio = torch.tensor([[1.19, 0.81, 1.0, 1.1]], dtype=torch.float64)
    grad, _ = _grad(get_preset("ppo"), ratio=ratio)
    torch.testing.assert_close(grad, -ADV * ratio / 4)


def test_asymmetric_clip_higher():
    ratio = torch.tensor([[1.25, 1.25, 0.81, 0.79]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    grad, _ = _grad(get_preset("dapo"), ratio=ratio, adv=adv)  # band [0.8, 1.28]
    assert grad[0, 3].item() == 0.0 and (grad[0, :3] != 0).all()


def test_dual_clip_bounds_negative_advantage():
    spec = get_preset("ppo").with_options(mask="dual_clip", dual_clip_c=3.0)
    ratio = torch.tensor([[4.0, 2.0, 4.0, 0.5]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    grad, _ = _grad(spec, ratio=ratio, adv=adv)
    assert grad[0, 0].item() == 0.0  # A < 0, r > c
    assert grad[0, 1].item() == pytest.approx(2.0 / 4)  # A < 0, r in (1.2, c): kept
    assert grad[0, 2].item() == 0.0  # A > 0, r > 1.2: PPO clip
    assert grad[0, 3].item() == 0.0  # A < 0, r < 0.8


def test_cispo_keeps_a_clipped_weight_gradient_where_ppo_has_none():
    spec = get_preset("cispo").with_options(clip_low=0.2, clip_high=0.2)
    grad, metrics = _grad(spec)
    weight = RATIO.clamp(0.8, 1.2)
    torch.testing.assert_close(grad, -ADV * weight / 4)
    assert (grad != 0).all()
    assert metrics["clip_frac"].item() == pytest.approx(1.0)


def test_constant_one_denominator_gives_grad_pi_through_logits():
    """pi_ref = 1: d loss / d logits = -A / N * d pi / d logits = -A / N * pi (onehot - p)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 4))
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    adv = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    loss, _ = policy_loss(
        "srft",
        logprobs=logprobs,
        old_logprobs=logprobs.detach(),
        advantages=adv,
        response_mask=mask,
        is_demo=torch.ones(3, dtype=torch.bool),
    )
    loss.backward()
    p = torch.softmax(logits.detach(), -1)
    pi = p.gather(-1, tokens[..., None])
    onehot = torch.nn.functional.one_hot(tokens, 7).double()
    expected = -adv[..., None] / 12 * pi * (onehot - p)
    torch.testing.assert_close(logits.grad, expected)


def test_kl_estimators_closed_form():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    d = lp - ref
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), d)
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), d**2 / 2)
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), torch.exp(ref - lp) - 1 - (ref - lp))
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(lp, ref, "k4")


def test_kl_loss_term_gradient():
    spec = get_preset("grpo").with_options(kl_coef=0.1, kl_estimator="k3", mask="none")
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    loss, metrics = policy_loss(
        spec,
        logprobs=lp,
        old_logprobs=lp.detach(),
        advantages=zeros,
        response_mask=torch.ones(1, 2),
        ref_logprobs=ref,
    )
    loss.backward()
    # d k3 / d lp = 1 - exp(ref - lp); token mean over 2 tokens
    torch.testing.assert_close(lp.grad, 0.1 * (1 - torch.exp(ref - lp.detach())) / 2)
    assert "kl_ref" in metrics
    assert spec.needs_ref_logprobs and not get_preset("grpo").needs_ref_logprobs


def test_tis_truncates_rollout_mismatch():
    spec = AlgorithmSpec(denominator="current", mask="none", tis_cap=2.0)
    lp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    rollout = torch.tensor([[-1.0 - 0.5, -1.0 - 2.0]], dtype=torch.float64)  # w = e^0.5, e^2
    adv = torch.ones(1, 2, dtype=torch.float64)
    loss, metrics = policy_loss(
        spec,
        logprobs=lp,
        advantages=adv,
        response_mask=torch.ones(1, 2),
        rollout_logprobs=rollout,
    )
    loss.backward()
    w = torch.tensor([[torch.e**0.5, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(lp.grad, -w / 2)
    assert metrics["tis_clip_frac"].item() == pytest.approx(0.5)


def test_entropy_bonus_sign():
    spec = get_preset("grpo").with_options(entropy_coef=0.01)
    lp = torch.full((1, 2), -1.0, dtype=torch.float64, requires_grad=True)
    ent = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    loss, m = policy_loss(
        spec,
        logprobs=lp,
        old_logprobs=lp.detach(),
        advantages=torch.zeros(1, 2),
        response_mask=torch.ones(1, 2),
        entropy=ent,
    )
    loss.backward()
    torch.testing.assert_close(ent.grad, torch.full((1, 2), -0.005, dtype=torch.float64))
    assert m["entropy"].item() == pytest.approx(1.0)
