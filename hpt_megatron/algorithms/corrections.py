"""Off-policy corrections between the behaviour policy and the trainer, and their mismatch metrics.

Shapes: B rows, T response positions. ``base`` is the trainer's log-prob of a sampled token at the
weights the update starts from (pi_prox: the recomputed pi_old, or pi_theta detached with one update
per step); ``rollout`` is the behaviour policy's, as the rollout engine reported it when it sampled
the token. They differ because the engine's kernels differ numerically from the trainer's
(precision, fused ops, MoE routing) and, in asynchronous runs, because the engine's weights were
older. With d_t = base_t - rollout_t, the importance ratio is computed at one of three levels:

    token       rho_t = exp(d_t)
    sequence    rho_t = exp(sum_t d_t)           (the exact sequence ratio, for every token)
    geometric   rho_t = exp(mean_t d_t)          (its per-token geometric mean; length-free)

**TIS** (truncated importance sampling; Ionides 2008; for LLM RL, Yao et al. 2025, "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training"): the on-policy term is
multiplied by the detached weight ``min(rho, tis_cap)`` at ``tis_level``.

**MIS** (masked importance sampling; Liu, Li et al. 2025, "When Speed Kills Stability:
Demystifying RL Collapse from the Training-Inference Mismatch"): tokens (``mis_level: token``) or
whole responses (``sequence``, ``geometric``) whose ratio at ``mis_level`` leaves
``[mis_low, mis_high]`` get weight 0; the others keep the IS weight (``rho`` at ``tis_level``,
truncated at ``tis_cap`` when it is set). The dropped tokens stay in the loss denominators, so
the loss is the mean over all tokens of the kept terms (no collective is needed for the totals).

**Decoupled PPO** (Hilton, Cobbe and Schulman 2022, "Batch size-invariance for policy
optimization"): the clip is taken against the proximal policy pi_prox (denominator ``old``, the
trainer's own log-probs before the update) and the term is weighted by behaviour/proximal,
``pi_prox / pi_rollout``: that is exactly ``denominator: old`` with TIS or MIS here, and it is what
every run with ``run.max_staleness > 0`` gets by default (``tis_cap`` 2 at token level) unless
the options choose another correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpt_megatron.config.algorithm_spec import AlgorithmSpec

_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: the bound of any ratio here, as in parts.py


@dataclass
class Correction:
    """Detached weights of the on-policy term and what the correction changed."""

    weight_bt: torch.Tensor  # [B, T]: multiply the on-policy term (0 where masked)
    truncated_bt: torch.Tensor  # [B, T] bool: TIS cut the weight at tis_cap
    masked_bt: torch.Tensor  # [B, T] bool: MIS dropped the token
    masked_b: torch.Tensor  # [B] bool: MIS dropped a token of the row (the whole row at
    #                          sequence / geometric level)


def log_ratio(
    base_bt: torch.Tensor, rollout_bt: torch.Tensor, valid_bt: torch.Tensor, level: str
) -> torch.Tensor:
    """log rho per token at ``level`` (token, sequence or geometric), bounded to +-20, 0 off
    ``valid_bt``."""
    d_bt = torch.where(valid_bt, base_bt.detach().double() - rollout_bt.double(), 0.0)
    if level == "token":
        log_bt = d_bt
    elif level in ("sequence", "geometric"):
        sum_b = d_bt.sum(-1)
        if level == "geometric":
            sum_b = sum_b / valid_bt.sum(-1).clamp_min(1)
        log_bt = sum_b[:, None].expand_as(d_bt)
    else:
        raise ValueError(f"correction level: expected token, sequence or geometric, got {level!r}")
    return torch.where(valid_bt, log_bt.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO), 0.0)


def rollout_correction(
    spec: AlgorithmSpec, base_bt: torch.Tensor, rollout_bt: torch.Tensor, valid_bt: torch.Tensor
) -> Correction:
    """The TIS / MIS weights of ``spec`` on the ``valid_bt`` (on-policy response) tokens."""
    weight_bt = torch.exp(log_ratio(base_bt, rollout_bt, valid_bt, spec.tis_level))
    truncated_bt = torch.zeros_like(valid_bt)
    if spec.tis_cap is not None:
        truncated_bt = (weight_bt > spec.tis_cap) & valid_bt
        weight_bt = weight_bt.clamp(max=spec.tis_cap)
    masked_bt = torch.zeros_like(valid_bt)
    if spec.mis_high is not None:
        rho_bt = torch.exp(log_ratio(base_bt, rollout_bt, valid_bt, spec.mis_level))
        masked_bt = ((rho_bt < spec.mis_band[0]) | (rho_bt > spec.mis_band[1])) & valid_bt
        weight_bt = torch.where(masked_bt, 0.0, weight_bt)
    weight_bt = torch.where(valid_bt, weight_bt, 1.0)
    return Correction(weight_bt.to(base_bt.dtype), truncated_bt, masked_bt, masked_bt.any(-1))


def mismatch_stats(
    base_bt: torch.Tensor, rollout_bt: torch.Tensor, valid_bt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token |log pi_trainer - log pi_rollout| and the k3 estimate of KL(pi_rollout ||
    pi_trainer) from the rollout's own samples, ``(abs_diff_bt, k3_bt, abs_diff_max)`` (0 off
    ``valid_bt``).

    With d = log pi_rollout - log pi_trainer on tokens sampled from pi_rollout: k3 = exp(-d) - 1
    + d (Schulman's unbiased, non-negative estimator)."""
    d_bt = torch.where(valid_bt, rollout_bt.double() - base_bt.detach().double(), 0.0)
    k3_bt = torch.exp((-d_bt).clamp(max=_MAX_LOG_RATIO)) - 1 + d_bt
    abs_bt = d_bt.abs()
    top = abs_bt.max() if abs_bt.numel() else abs_bt.new_zeros(())
    return abs_bt, k3_bt, top
