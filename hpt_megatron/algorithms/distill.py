"""The distillation part of the advantage: per-token reverse KL to a teacher.

Shapes: B rows, T response positions (left-aligned; zero outside ``response_mask``).

On-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes" (GKD) with the reverse-KL divergence; Thinking Machines, "On-Policy
Distillation", Lu & Thinking Machines Lab 2025): the student pi_theta samples y, a teacher
pi_T scores every sampled token, and each token's advantage is

    A_t = coef * (log pi_T(y_t | y_<t) - log pi_theta(y_t | y_<t))

with the student's log-prob detached (pi_old: the weights that sampled y). It is the negative of
the per-token k1 estimate of the reverse KL(pi_theta || pi_T), so the estimator's on-policy row
(pi_ref = pi_theta, no mask: term = -A_t * log pi_theta(y_t)) has the expected gradient

    E_{y_t ~ pi_theta}[ -A_t * grad log pi_theta(y_t) ]
        = coef * sum_v grad pi_theta(v) * (log pi_theta(v) - log pi_T(v))
        = coef * grad KL(pi_theta(. | y_<t) || pi_T(. | y_<t))

at every position (the term sum_v pi * grad log pi = grad sum_v pi = 0 drops out). As in the
Thinking Machines recipe each token gets only its own KL (discount 0): the prefix's influence on
later positions' KL is not credited back, which keeps the signal dense and low-variance.

The part stands alone (advantage ``none``, preset ``opd``) or is added to an outcome advantage
(``grpo`` with ``distill_coef > 0``: GRPO + distillation); ``distill_coef`` is its ``coef``.
"""

from __future__ import annotations

import torch

from hpt_megatron.algorithms._checks import check_bt, check_mask


def distill_advantages(
    *,
    logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float,
) -> torch.Tensor:
    """``[B, T]`` fp32 ``coef * (log pi_T - log pi_theta)`` on response tokens, 0 elsewhere.

    Args:
        logprobs: ``[B, T]`` the student's log-probs of the sampled tokens (detached here).
        teacher_logprobs: ``[B, T]`` the teacher's log-probs of the same tokens.
        response_mask: ``[B, T]``, 1 on response tokens.
        coef: the part's coefficient (``distill_coef``), >= 0.

    Raises:
        ValueError: mismatched shapes, a negative ``coef``, or a non-finite log-prob on a
            response token.
    """
    mask_bt = check_mask(response_mask).bool()
    check_bt("logprobs", logprobs, mask_bt.shape)
    check_bt("teacher_logprobs", teacher_logprobs, mask_bt.shape)
    if coef < 0:
        raise ValueError(f"coef: must be >= 0, got {coef}")
    diff_bt = teacher_logprobs.detach().double() - logprobs.detach().double()
    if not torch.isfinite(diff_bt[mask_bt]).all():
        raise ValueError("teacher_logprobs, logprobs: non-finite values on response tokens")
    return torch.where(mask_bt, coef * diff_bt, torch.zeros_like(diff_bt)).float()


def reverse_kl_tokens(
    *, logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """The per-token k1 estimate ``log pi_theta - log pi_T`` of KL(pi_theta || pi_T) on the
    response tokens (1-D, in row order): what the metrics' mean and max are taken over."""
    mask_bt = check_mask(response_mask).bool()
    check_bt("logprobs", logprobs, mask_bt.shape)
    check_bt("teacher_logprobs", teacher_logprobs, mask_bt.shape)
    return (logprobs.detach().double() - teacher_logprobs.detach().double())[mask_bt]
