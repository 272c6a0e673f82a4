"""Advantage estimates A_hat, the third part of the estimator.

Shapes: B rows (responses), T response positions, G groups. Rows are left-aligned: a row's
response tokens are the positions where ``response_mask_bt`` is 1.

Outcome-reward kinds give every token of a response the same advantage; ``reinforce_pp`` and
``gae`` work per token. Group kinds (grpo, dr_grpo, rloo, srft) need at least two members per group
in the statistics; ``is_demo`` rows (offline demonstrations) are left out of the statistics for
grpo/dr_grpo/rloo (they get the on-policy group's baseline) and included for srft.
"""

from __future__ import annotations

from typing import Any

import torch

from hpt_megatron.algorithms._checks import (
    Vector,
    as_vector,
    check_bt,
    check_mask,
    check_rewards,
    group_index,
    require_group_size,
)

GROUP_KINDS = ("grpo", "dr_grpo", "rloo", "srft")
KINDS = ("none", "one", "reinforce", *GROUP_KINDS, "reinforce_pp", "gae")


def compute_advantages(
    kind: str,
    *,
    rewards: Vector | None,
    group_ids: Vector | None = None,
    response_mask: torch.Tensor,
    is_demo: Vector | None = None,
    **options: Any,
) -> torch.Tensor:
    """Per-token advantages ``[B, T]`` (zero outside the response) of estimator ``kind``.

    Args:
        kind: one of ``none`` (A = 0: no outcome part; the distillation part of
            ``distill.py`` supplies the signal), ``one`` (SFT: A = 1), ``reinforce`` (+1 if
            reward > ``threshold`` else -1),
            ``grpo`` ((R - mean_g) / (std_g + eps); unbiased std unless ``std_unbiased=False``,
            eps = 1e-6), ``dr_grpo`` (R - mean_g), ``rloo`` (R - mean of the others),
            ``srft`` (grpo over on-policy and demonstration rows together), ``reinforce_pp``
            (token returns whitened over the batch) or ``gae`` (needs ``values``).
        rewards: ``[B]`` outcome reward per row (unused by ``none`` and ``one``).
        group_ids: ``[B]`` int group (prompt) id per row; needed by group kinds.
        response_mask: ``[B, T]``, 1 on response tokens.
        is_demo: ``[B]`` bool, True for offline demonstrations.
        **options: kind-specific: ``std_unbiased``, ``eps``, ``threshold``, ``token_rewards``
            (``[B, T]``, e.g. a folded KL penalty; reinforce_pp, gae), ``values``/``dones``
            (``[B, T]``; gae), ``gamma``, ``lam``, ``whiten`` (gae).

    Raises:
        ValueError: unknown kind or option, mismatched shapes, NaN rewards, a group with fewer
            than two members in the statistics.
    """
    mask_bt = check_mask(response_mask).to(torch.float64)
    batch = mask_bt.shape[0]
    if kind == "one":
        _no_options(kind, options, ())
        return mask_bt.float()
    if kind == "none":
        _no_options(kind, options, ())
        return torch.zeros_like(mask_bt, dtype=torch.float32)
    if rewards is None:
        raise ValueError(f"rewards: advantage kind '{kind}' needs rewards")
    rewards_b = check_rewards(rewards, batch)
    if kind == "reinforce":
        _no_options(kind, options, ("threshold",))
        sign_b = torch.where(rewards_b > options.get("threshold", 0.0), 1.0, -1.0)
        return (sign_b[:, None] * mask_bt).float()
    if kind in GROUP_KINDS:
        if group_ids is None:
            raise ValueError(f"group_ids: advantage kind '{kind}' needs a group id per row")
        _no_options(kind, options, ("std_unbiased", "eps"))
        group_ids_b = as_vector("group_ids", group_ids, torch.int64, batch)
        demo_b = _demo_flags(is_demo, batch)
        adv_b = _group_advantage(kind, rewards_b, group_ids_b, demo_b, **options)
        return (adv_b[:, None] * mask_bt).float()
    if kind == "reinforce_pp":
        _no_options(kind, options, ("eps", "token_rewards"))
        returns_bt = _token_returns(rewards_b, mask_bt, options.get("token_rewards"), 1.0)
        return _whiten(returns_bt, mask_bt, options.get("eps", 1e-6)).float()
    if kind == "gae":
        _no_options(kind, options, ("values", "dones", "token_rewards", "gamma", "lam", "whiten"))
        adv_bt, _ = gae(rewards=rewards_b, response_mask=mask_bt, **options)
        if options.get("whiten", True):
            adv_bt = _whiten(adv_bt, mask_bt, 1e-6)
        return adv_bt.float()
    raise ValueError(f"kind: unknown advantage '{kind}'; expected one of {list(KINDS)}")


def _no_options(kind: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"options {unknown} do not apply to advantage '{kind}' (takes {allowed})")


def _demo_flags(is_demo: Vector | None, batch: int) -> torch.Tensor:
    if is_demo is None:
        return torch.zeros(batch, dtype=torch.bool)
    return as_vector("is_demo", is_demo, torch.bool, batch)


def _group_advantage(
    kind: str,
    rewards_b: torch.Tensor,
    group_ids_b: torch.Tensor,
    demo_b: torch.Tensor,
    std_unbiased: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Outcome advantage per row from its group's statistics (float64 ``[B]``)."""
    in_stats_b = torch.ones_like(demo_b) if kind == "srft" else ~demo_b
    ids_g, inverse_b, _ = group_index(group_ids_b)
    num_g = ids_g.numel()
    weight_b = in_stats_b.double()
    count_g = torch.zeros(num_g, dtype=torch.float64).index_add_(0, inverse_b, weight_b)
    require_group_size(ids_g, count_g.long(), 2, f"advantage '{kind}' (group statistics)")
    sum_g = torch.zeros(num_g, dtype=torch.float64).index_add_(0, inverse_b, rewards_b * weight_b)
    mean_b = (sum_g / count_g)[inverse_b]
    if kind == "dr_grpo":
        return rewards_b - mean_b
    if kind == "rloo":
        # R_i - mean of the other members; a row outside the statistics has all members as others.
        count_b = count_g[inverse_b]
        others_b = torch.where(in_stats_b, count_b - 1, count_b)
        return (rewards_b * count_b - sum_g[inverse_b]) / others_b
    sq_b = (rewards_b - mean_b) ** 2 * weight_b
    sq_g = torch.zeros(num_g, dtype=torch.float64).index_add_(0, inverse_b, sq_b)
    std_g = (sq_g / (count_g - 1 if std_unbiased else count_g)).sqrt()
    return (rewards_b - mean_b) / (std_g[inverse_b] + eps)


def _token_returns(
    rewards_b: torch.Tensor,
    mask_bt: torch.Tensor,
    token_rewards_bt: torch.Tensor | None,
    gamma: float,
) -> torch.Tensor:
    """Discounted return-to-go per token; the outcome reward sits on each row's last token."""
    rewards_bt = _place_outcome(rewards_b, mask_bt, token_rewards_bt)
    returns_bt = torch.zeros_like(rewards_bt)
    running_b = torch.zeros_like(rewards_b)
    for t in range(mask_bt.shape[1] - 1, -1, -1):
        running_b = rewards_bt[:, t] + gamma * running_b * mask_bt[:, t]
        returns_bt[:, t] = running_b
    return returns_bt * mask_bt


def _place_outcome(
    rewards_b: torch.Tensor, mask_bt: torch.Tensor, token_rewards_bt: torch.Tensor | None
) -> torch.Tensor:
    rewards_bt = torch.zeros_like(mask_bt)
    length_b = mask_bt.sum(-1).long()
    rows = (length_b > 0).nonzero().flatten()
    rewards_bt[rows, length_b[rows] - 1] = rewards_b[rows]
    if token_rewards_bt is not None:
        check_bt("token_rewards", token_rewards_bt, mask_bt.shape)
        rewards_bt = rewards_bt + token_rewards_bt.to(torch.float64) * mask_bt
    return rewards_bt


def _whiten(x_bt: torch.Tensor, mask_bt: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / (std + eps) over the valid tokens of the whole batch (biased std)."""
    n = mask_bt.sum()
    if n < 2:
        raise ValueError("response_mask: whitening over the batch needs at least 2 response tokens")
    mean = (x_bt * mask_bt).sum() / n
    var = (((x_bt - mean) * mask_bt) ** 2).sum() / n
    return (x_bt - mean) / (var.sqrt() + eps) * mask_bt


def gae(
    *,
    rewards: Vector,
    response_mask: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): ``(advantages_bt, returns_bt)``.

    The outcome reward is placed on each row's last response token; ``token_rewards`` are added
    per token. ``values`` ``[B, T]`` are the critic's V(s_t); after a row's last token (or where
    ``dones`` is True) nothing is bootstrapped. ``whiten`` is applied by ``compute_advantages``.
    """
    del whiten  # applied by the caller, so that returns stay unwhitened
    mask_bt = check_mask(response_mask).to(torch.float64)
    rewards_b = check_rewards(rewards, mask_bt.shape[0])
    check_bt("values", values, mask_bt.shape)
    check_bt("dones", dones, mask_bt.shape)
    values_bt = values.to(torch.float64) * mask_bt
    cont_bt = mask_bt if dones is None else mask_bt * (1 - dones.to(torch.float64))
    rewards_bt = _place_outcome(rewards_b, mask_bt, token_rewards)
    adv_bt = torch.zeros_like(values_bt)
    next_value_b = torch.zeros_like(rewards_b)
    next_adv_b = torch.zeros_like(rewards_b)
    for t in range(mask_bt.shape[1] - 1, -1, -1):
        # cont_bt[:, t] = 0 at a done token: no bootstrap from t + 1. Positions past a row's end
        # hold value 0 and advantage 0, so the last token bootstraps from nothing.
        delta_b = rewards_bt[:, t] + gamma * cont_bt[:, t] * next_value_b - values_bt[:, t]
        adv_b = (delta_b + gamma * lam * cont_bt[:, t] * next_adv_b) * mask_bt[:, t]
        adv_bt[:, t] = adv_b
        next_value_b, next_adv_b = values_bt[:, t], adv_b
    return adv_bt, (adv_bt + values_bt) * mask_bt


def fold_kl_into_rewards(
    *,
    rewards: Vector,
    kl: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float,
) -> torch.Tensor:
    """Outcome rewards ``[B]`` minus ``coef`` times each row's summed per-token KL ``[B, T]``.

    For token-level estimators (``gae``, ``reinforce_pp``) pass ``token_rewards=-coef * kl``
    to ``compute_advantages`` instead. ``kl`` comes from ``parts.kl_estimate``.
    """
    mask_bt = check_mask(response_mask).to(torch.float64)
    rewards_b = check_rewards(rewards, mask_bt.shape[0])
    check_bt("kl", kl, mask_bt.shape)
    return rewards_b - coef * (kl.detach().to(torch.float64) * mask_bt).sum(-1)


def kl_penalised_advantages(
    kind: str,
    *,
    rewards: Vector,
    kl: torch.Tensor,
    coef: float,
    response_mask: torch.Tensor,
    group_ids: Vector | None = None,
    is_demo: Vector | None = None,
    **options: Any,
) -> torch.Tensor:
    """Advantages ``[B, T]`` of ``kind`` with the KL penalty folded into the rewards
    (``kl_mode='reward'``): ``-coef * kl`` per token for the token-level kinds (``reinforce_pp``,
    ``gae``), each row's outcome reward minus ``coef`` times its summed KL for the others.

    ``kl`` ``[B, T]`` is the per-token estimate against the reference (``parts.kl_estimate``);
    ``options`` as for :func:`compute_advantages`.
    """
    mask_bt = check_mask(response_mask)
    check_bt("kl", kl, mask_bt.shape)
    if kind in ("reinforce_pp", "gae"):
        token_rewards_bt = -coef * kl.detach().to(torch.float64) * mask_bt
        return compute_advantages(
            kind,
            rewards=rewards,
            group_ids=group_ids,
            response_mask=mask_bt,
            is_demo=is_demo,
            token_rewards=token_rewards_bt,
            **options,
        )
    folded_b = fold_kl_into_rewards(rewards=rewards, kl=kl, response_mask=mask_bt, coef=coef)
    return compute_advantages(
        kind,
        rewards=folded_b,
        group_ids=group_ids,
        response_mask=mask_bt,
        is_demo=is_demo,
        **options,
    )
