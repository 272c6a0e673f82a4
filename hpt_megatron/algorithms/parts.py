"""Per-token surrogate terms: the denominator pi_ref and the stabilization mask 1_stable.

Shapes: B rows, T response positions.

Every term is written so that its gradient with respect to the per-token log-prob ``logprobs_bt``
is minus the estimator: d(term)/d(log pi) = -1_stable * A * pi / pi_ref. Positions outside the
response must be masked out by the caller (``aggregation.py``); here they are kept finite.

Denominators (on-policy rows):
    current  pi_ref = pi_theta (detached): term = -A * log pi          (value: A-weighted NLL)
    old      pi_ref = pi_old: term = -A * r, r = pi / pi_old            (PPO surrogate)
    gspo     pi_ref = pi_theta * (pi_old(y) / pi_theta(y))^(1/|y|): term = -A * s_t with value
             s = exp(mean_t log r) and d s_t / d log pi_t = s (the GSPO-token form; with
             seq_mean_token_mean aggregation it equals sequence-level GSPO exactly)
Demonstration rows: ``one`` (pi_ref = 1): term = -A * f(pi), f(pi) = pi or LUFFY's
pi / (pi + gamma); ``current``: term = -A * log pi.

Masks (``old``): ``clip`` keeps the gradient unless the ratio left [1 - eps_low, 1 + eps_high] on
the side sign(A) selects (A > 0: above; A < 0: below); ``dual_clip`` also zeroes it for A < 0 when
r > c; ``cispo`` never zeroes it but uses the detached weight clip(r, 1 - eps_low, 1 + eps_high)
in place of r: term = -A * sg(clip(r)) * log pi. ``seq_clip`` (gspo) clips s per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpt_megatron.config.algorithm_spec import AlgorithmSpec

_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps fp32 ratios of garbage inputs finite


@dataclass
class TokenTerms:
    """The per-token RL term and the statistics that metrics report."""

    term_bt: torch.Tensor  # with grad
    clipped_bt: torch.Tensor  # bool: the mask changed this token (zeroed or clipped weight)
    ratio_bt: torch.Tensor  # detached pi / pi_old (1 where there is no old policy)


def kl_estimate(
    logprobs_bt: torch.Tensor, ref_logprobs_bt: torch.Tensor, estimator: str
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) on sampled tokens (Schulman's k1/k2/k3).

    With d = log pi - log pi_ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d.
    """
    d_bt = logprobs_bt - ref_logprobs_bt
    if estimator == "k1":
        return d_bt
    if estimator == "k2":
        return 0.5 * d_bt**2
    if estimator == "k3":
        neg_d_bt = (-d_bt).clamp(max=_MAX_LOG_RATIO)
        return torch.exp(neg_d_bt) - 1 + d_bt
    raise ValueError(f"kl_estimator: expected k1, k2 or k3, got {estimator!r}")


def on_policy_terms(
    spec: AlgorithmSpec,
    logprobs_bt: torch.Tensor,
    old_logprobs_bt: torch.Tensor | None,
    advantages_bt: torch.Tensor,
    valid_bt: torch.Tensor,
) -> TokenTerms:
    """The RL term of on-policy rows for ``spec.denominator`` and ``spec.mask``.

    ``valid_bt`` (bool) marks the on-policy response tokens; elsewhere the old log-prob is
    replaced by the current one so that no garbage reaches the ratio.
    """
    adv_bt = advantages_bt.detach().to(logprobs_bt.dtype)
    if spec.denominator == "current":
        no_clip_bt = torch.zeros_like(valid_bt)
        return TokenTerms(-adv_bt * logprobs_bt, no_clip_bt, torch.ones_like(logprobs_bt).detach())
    assert old_logprobs_bt is not None
    old_bt = torch.where(valid_bt, old_logprobs_bt.to(logprobs_bt.dtype), logprobs_bt.detach())
    log_ratio_bt = (logprobs_bt - old_bt).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if spec.denominator == "gspo":
        return _gspo_terms(spec, logprobs_bt, log_ratio_bt, adv_bt, valid_bt)
    ratio_bt = torch.exp(log_ratio_bt)
    low, high = 1.0 - spec.clip_low, 1.0 + spec.clip_high
    if spec.mask == "cispo":
        weight_bt = ratio_bt.detach().clamp(low, high)
        clipped_bt = (ratio_bt.detach() < low) | (ratio_bt.detach() > high)
        return TokenTerms(-adv_bt * weight_bt * logprobs_bt, clipped_bt, ratio_bt.detach())
    term_bt = -adv_bt * ratio_bt
    clipped_bt = torch.zeros_like(valid_bt)
    if spec.mask in ("clip", "dual_clip"):
        r = ratio_bt.detach()
        clipped_bt = ((adv_bt > 0) & (r > high)) | ((adv_bt < 0) & (r < low))
        # torch.where, not max(): the clipped branch is a constant, so its gradient is exactly 0.
        term_bt = torch.where(clipped_bt, -adv_bt * r.clamp(low, high), term_bt)
        if spec.mask == "dual_clip":
            dual_bt = (adv_bt < 0) & (r > spec.dual_clip_c)
            term_bt = torch.where(dual_bt, -adv_bt * spec.dual_clip_c, term_bt)
            clipped_bt = clipped_bt | dual_bt
    return TokenTerms(term_bt, clipped_bt & valid_bt, ratio_bt.detach())


def _gspo_terms(
    spec: AlgorithmSpec,
    logprobs_bt: torch.Tensor,
    log_ratio_bt: torch.Tensor,
    adv_bt: torch.Tensor,
    valid_bt: torch.Tensor,
) -> TokenTerms:
    valid = valid_bt.to(logprobs_bt.dtype)
    length_b = valid.sum(-1).clamp_min(1)
    seq_log_ratio_b = (log_ratio_bt * valid).sum(-1) / length_b
    s_b = torch.exp(seq_log_ratio_b.detach())
    # value s, gradient s per token: sg(s) * exp(log pi - sg(log pi)).
    s_bt = s_b[:, None] * torch.exp(logprobs_bt - logprobs_bt.detach())
    term_bt = -adv_bt * s_bt
    clipped_bt = torch.zeros_like(valid_bt)
    if spec.mask == "seq_clip":
        low, high = 1.0 - spec.clip_low, 1.0 + spec.clip_high
        s_full_bt = s_b[:, None].expand_as(adv_bt)
        clipped_bt = ((adv_bt > 0) & (s_full_bt > high)) | ((adv_bt < 0) & (s_full_bt < low))
        term_bt = torch.where(clipped_bt, -adv_bt * s_full_bt.clamp(low, high), term_bt)
    return TokenTerms(term_bt, clipped_bt & valid_bt, s_b[:, None].expand_as(adv_bt))


def demo_terms(
    spec: AlgorithmSpec, logprobs_bt: torch.Tensor, advantages_bt: torch.Tensor
) -> torch.Tensor:
    """The RL term of demonstration rows: pi_ref = 1 (optionally LUFFY-shaped) or pi_theta."""
    adv_bt = advantages_bt.detach().to(logprobs_bt.dtype)
    if spec.demo_denominator == "current":
        return -adv_bt * logprobs_bt
    prob_bt = torch.exp(logprobs_bt)
    if spec.luffy_gamma is not None:
        prob_bt = prob_bt / (prob_bt + spec.luffy_gamma)
    return -adv_bt * prob_bt
