"""The distillation part (reverse KL to a teacher): a hand computation, and its policy gradient
equal to autograd of the on-policy reverse KL (fp32, 1e-6)."""

import itertools

import pytest
import torch

from hpt_megatron.algorithms import (
    compute_advantages,
    distill_advantages,
    policy_loss,
    reverse_kl_tokens,
    zero_gradient_rows,
)
from hpt_megatron.config.algorithm_spec import OptionError
from hpt_megatron.config.presets import get_preset


def test_advantage_is_coef_times_teacher_minus_student_by_hand():
    student = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, 0.0]])
    teacher = torch.tensor([[-0.25, -2.0, -1.0], [-0.6, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = distill_advantages(
        logprobs=student, teacher_logprobs=teacher, response_mask=mask, coef=0.5
    )
    # 0.5 * (teacher - student), 0 past the second row's response
    expected = torch.tensor([[0.125, -0.5, 0.5], [-0.25, 1.25, 0.0]])
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)
    kl = reverse_kl_tokens(logprobs=student, teacher_logprobs=teacher, response_mask=mask)
    torch.testing.assert_close(kl, torch.tensor([-0.25, 1.0, -1.0, 0.5, -2.5], dtype=torch.float64))


def test_bad_inputs_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="teacher_logprobs: shape"):
        distill_advantages(
            logprobs=x, teacher_logprobs=torch.zeros(2, 4), response_mask=x, coef=1.0
        )
    with pytest.raises(ValueError, match="coef: must be >= 0"):
        distill_advantages(logprobs=x, teacher_logprobs=x, response_mask=x + 1, coef=-1.0)
    inf = torch.tensor([[0.0, -float("inf"), 0.0]] * 2)
    with pytest.raises(ValueError, match="non-finite"):
        distill_advantages(logprobs=x, teacher_logprobs=inf, response_mask=x + 1, coef=1.0)


def test_policy_gradient_equals_autograd_of_on_policy_reverse_kl():
    """E_{y ~ pi_theta}[grad of preset opd's loss] = grad of sum_t KL(pi_theta,t || pi_T,t).

    T positions with their own logits (teacher-forced, so positions are independent) over a
    vocabulary of V: the expectation is exact, an enumeration of all V**T sequences, each row
    weighted by its probability (rl_weight, with the loss's token total 1 and T tokens a row).
    """
    T, V, coef = 3, 4, 0.7
    g = torch.Generator().manual_seed(0)
    logits_tv = torch.randn(T, V, generator=g).requires_grad_()
    teacher_tv = torch.log_softmax(torch.randn(T, V, generator=g), -1)
    student_tv = torch.log_softmax(logits_tv, -1)
    # autograd of the reverse KL, summed over positions
    kl = (student_tv.exp() * (student_tv - teacher_tv)).sum()
    (expected,) = torch.autograd.grad(coef * kl, logits_tv, retain_graph=True)
    # the estimator: every sequence a row, its probability the row's weight
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))  # [V**T, T]
    pos = torch.arange(T)
    logprobs_bt = student_tv[pos, seqs]
    teacher_bt = teacher_tv[pos, seqs]
    mask_bt = torch.ones_like(logprobs_bt)
    adv_bt = compute_advantages("none", rewards=None, response_mask=mask_bt) + distill_advantages(
        logprobs=logprobs_bt, teacher_logprobs=teacher_bt, response_mask=mask_bt, coef=coef
    )
    prob_b = logprobs_bt.detach().sum(-1).exp()
    loss, metrics = policy_loss(
        "opd",
        logprobs=logprobs_bt,
        advantages=adv_bt,
        response_mask=mask_bt,
        rl_weight=prob_b,
        global_num_tokens=1.0,
        global_num_seqs=1.0,
    )
    (grad,) = torch.autograd.grad(loss, logits_tv)
    assert logits_tv.dtype == torch.float32
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
    assert float(metrics["pg_loss"]) == pytest.approx(
        -(prob_b[:, None] * adv_bt * logprobs_bt.detach()).sum().item(), rel=1e-5
    )


def test_grpo_plus_distillation_adds_the_parts():
    mask = torch.ones(4, 2)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    outcome = compute_advantages(
        "grpo", rewards=rewards, group_ids=[0, 0, 1, 1], response_mask=mask
    )
    student, teacher = -torch.rand(4, 2), -torch.rand(4, 2)
    part = distill_advantages(
        logprobs=student, teacher_logprobs=teacher, response_mask=mask, coef=0.1
    )
    torch.testing.assert_close(part, 0.1 * (teacher - student))
    spec = get_preset("grpo").with_options(distill_coef=0.1)
    assert spec.needs_teacher_logprobs and not get_preset("grpo").needs_teacher_logprobs
    # rows with a zero outcome advantage still get the teacher's per-token signal: never elided
    zero = zero_gradient_rows(
        spec, advantages=outcome[:, 0] * 0, rl_weight=torch.ones(4), sft_weight=torch.zeros(4)
    )
    assert not zero.any()


def test_options_of_the_part_are_checked_naming_the_key():
    assert get_preset("opd").needs_teacher_logprobs
    with pytest.raises(OptionError, match="advantage: 'none'"):
        get_preset("opd").with_options(distill_coef=0.0)
    with pytest.raises(OptionError, match="distill_coef: must be >= 0"):
        get_preset("grpo").with_options(distill_coef=-1.0)
    with pytest.raises(OptionError, match="distill_coef: the distillation part is not"):
        get_preset("ppo").with_options(distill_coef=0.1)
    with pytest.raises(OptionError, match="teacher_route: 'always'"):
        get_preset("hpt").with_options(teacher_route="always")
