"""The critic's loss (PPO's clipped value loss) and explained variance.

Shapes: B rows, T response positions; ``mask_bt`` is 1 on response tokens.

    L_V = 1/2 * token_mean( max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) )

with R the GAE returns and V_old the values before the update (Schulman et al. 2017; the ``max``
form as in the PPO2 baselines, verl and OpenRLHF). ``num_tokens`` is the mini-batch's response
tokens over every micro-batch and rank, so the shares sum to the mini-batch loss.
"""

from __future__ import annotations

import torch

from hpt_megatron.algorithms._checks import check_bt, check_mask


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
