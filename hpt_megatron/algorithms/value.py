"""The critic's loss (PPO's clipped value loss), explained variance, and the ceiling on the
explained variance of a critic that sees only the prompt.

Shapes: B rows, T response positions; ``mask_bt`` is 1 on response tokens.

    L_V = 1/2 * token_mean( max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) )

with R the GAE returns and V_old the values before the update (Schulman et al. 2017; the ``max``
form as in the PPO2 baselines, verl and OpenRLHF). ``num_tokens`` is the mini-batch's response
tokens over every micro-batch and rank, so the shares sum to the mini-batch loss.
"""

from __future__ import annotations

import torch

from hpt_megatron.algorithms._checks import (
    Vector,
    as_vector,
    check_bt,
    check_mask,
    check_rewards,
    group_index,
)


def value_loss(
    *,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float | None,
    num_tokens: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss share of one micro-batch and its metrics (shares that sum over
    micro-batches and ranks to the mini-batch token means): ``value_loss``,
    ``value_clip_frac`` (tokens where the clipped term is the larger), ``value_mean``."""
    mask_bt = check_mask(response_mask).to(values.dtype)
    for name, tensor in (("old_values", old_values), ("returns", returns)):
        check_bt(name, tensor, mask_bt.shape)
    old_bt, returns_bt = old_values.to(values.dtype), returns.to(values.dtype)
    loss_bt = (values - returns_bt) ** 2
    clipped_bt = torch.zeros_like(mask_bt, dtype=torch.bool)
    if cliprange_value is not None:
        v_clip_bt = old_bt + (values - old_bt).clamp(-cliprange_value, cliprange_value)
        loss_clip_bt = (v_clip_bt - returns_bt) ** 2
        clipped_bt = loss_clip_bt > loss_bt
        loss_bt = torch.maximum(loss_bt, loss_clip_bt)
    denominator = max(float(num_tokens), 1.0)
    loss = 0.5 * (loss_bt * mask_bt).sum() / denominator
    metrics = {
        "value_loss": loss.detach().float(),
        "value_clip_frac": ((clipped_bt * mask_bt).sum() / denominator).detach().float(),
        "value_mean": ((values.detach() * mask_bt).sum() / denominator).float(),
    }
    return loss, metrics


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor
) -> float:
    """1 - Var(R - V) / Var(R) over the response tokens (1: perfect, 0: as good as the mean)."""
    mask_bt = check_mask(response_mask).bool()
    r_n, v_n = returns[mask_bt].double(), values[mask_bt].double()
    var_r = r_n.var(unbiased=False)
    if r_n.numel() < 2 or var_r == 0:
        return 0.0
    return float(1 - (r_n - v_n).var(unbiased=False) / var_r)


def prompt_explained_variance_bound(
    rewards: Vector, group_ids: Vector, lengths: Vector | None = None
) -> float | None:
    """The explained variance the best critic that sees only the prompt could reach, estimated
    from the rows' outcome rewards and their prompt groups (None: no group has 2 members).

    Its values are each prompt's success rate p_g, so its residual is the reward's variance
    within the prompt: ``1 - E[Var(R | prompt)] / Var(R)``, with each group's unbiased sample
    variance for Var(R | prompt). ``lengths`` (response tokens per row) weight the rows as
    :func:`explained_variance` weights them: over tokens, with the return the outcome on each
    token (gamma = 1, no token rewards). Rows of groups with one member are left out. What a
    critic can explain beyond it comes from the response prefix (a mistake already made).
    """
    rewards_b = check_rewards(rewards)
    batch = rewards_b.numel()
    group_ids_b = as_vector("group_ids", group_ids, torch.int64, batch)
    weight_b = torch.ones(batch, dtype=torch.float64)
    if lengths is not None:
        weight_b = as_vector("lengths", lengths, torch.float64, batch)
    _, inverse_b, counts_g = group_index(group_ids_b)
    num_g = counts_g.numel()
    sum_g = torch.zeros(num_g, dtype=torch.float64).index_add_(0, inverse_b, rewards_b)
    mean_b = (sum_g / counts_g)[inverse_b]
    sq_b = (rewards_b - mean_b) ** 2
    sq_g = torch.zeros(num_g, dtype=torch.float64).index_add_(0, inverse_b, sq_b)
    counts_b = counts_g[inverse_b]
    keep_b = counts_b >= 2
    if not keep_b.any():
        return None
    within_b = sq_g[inverse_b][keep_b] / (counts_b[keep_b] - 1)
    w_b, r_b = weight_b[keep_b], rewards_b[keep_b]
    total = w_b.sum()
    mean = (w_b * r_b).sum() / total
    var_r = (w_b * (r_b - mean) ** 2).sum() / total
    if var_r == 0:
        return 0.0
    return float(1 - (w_b * within_b).sum() / total / var_r)
