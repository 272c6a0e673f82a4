"""Aggregation of per-token terms into a loss, and the global totals that make it split-invariant.

Shapes: B rows, T response positions.

A mini-batch is split into micro-batches (and data-parallel ranks). ``policy_loss`` returns each
micro-batch's *share*: the loss of the whole mini-batch is the SUM of the shares, provided the
denominators below are the mini-batch totals (``loss_totals`` summed over micro-batches and
all-reduced over DP). Without totals the micro-batch's own counts are used.

Rows belong to terms by weight: the RL term holds rows with ``rl_weight != 0``, the SFT term rows
with ``sft_weight != 0``, and "all" rows with either (the entropy bonus).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

TERMS = ("rl", "sft", "all")
Totals = Mapping[str, float | int | torch.Tensor]


def aggregate(
    term_bt: torch.Tensor,
    mask_bt: torch.Tensor,
    row_weight_b: torch.Tensor,
    mode: str,
    *,
    num_tokens: float | torch.Tensor,
    num_seqs: float | torch.Tensor,
    constant: float = 1.0,
) -> torch.Tensor:
    """Sum of ``row_weight * term`` over response tokens, normalised by ``mode``.

    token_mean: / num_tokens. seq_mean_token_mean: each row's token mean, summed, / num_seqs.
    seq_mean_token_sum: / num_seqs. token_sum_norm: / constant (e.g. 8192).
    """
    weighted_bt = term_bt * mask_bt * row_weight_b[:, None].to(term_bt.dtype)
    dtype = weighted_bt.dtype
    if mode == "token_mean":
        return weighted_bt.sum() / _at_least_one(num_tokens, dtype)
    if mode == "seq_mean_token_mean":
        per_row_b = weighted_bt.sum(-1) / mask_bt.sum(-1).clamp_min(1)
        return per_row_b.sum() / _at_least_one(num_seqs, dtype)
    if mode == "seq_mean_token_sum":
        return weighted_bt.sum() / _at_least_one(num_seqs, dtype)
    if mode == "token_sum_norm":
        return weighted_bt.sum() / constant
    raise ValueError(f"aggregation: unknown mode {mode!r}")


def _at_least_one(
    count: float | torch.Tensor, dtype: torch.dtype = torch.float32
) -> float | torch.Tensor:
    # An empty term (no RL rows in the whole mini-batch) has a zero sum: divide by 1, not 0.
    if isinstance(count, torch.Tensor):
        return count.to(dtype).clamp_min(1)
    return max(float(count), 1.0)


def term_rows(rl_weight_b: torch.Tensor, sft_weight_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool ``[B]`` membership of each term."""
    rl_b, sft_b = rl_weight_b != 0, sft_weight_b != 0
    return {"rl": rl_b, "sft": sft_b, "all": rl_b | sft_b}


def count_totals(
    tokens_b: torch.Tensor, rows: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(response tokens per term, rows per term) of rows with ``tokens_b`` response tokens each,
    as float64 scalars."""
    tokens_b = tokens_b.to(torch.float64)
    num_tokens = {k: (tokens_b * rows[k]).sum() for k in TERMS}
    num_seqs = {k: rows[k].to(torch.float64).sum() for k in TERMS}
    return num_tokens, num_seqs


def pack_totals(num_tokens: Totals, num_seqs: Totals) -> torch.Tensor:
    """The six totals as one float64 tensor ``[6]`` (all-reduce it with SUM over DP)."""
    values = [num_tokens[k] for k in TERMS] + [num_seqs[k] for k in TERMS]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])


def unpack_totals(totals_6: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """Inverse of ``pack_totals``: ``(global_num_tokens, global_num_seqs)`` dicts."""
    if totals_6.shape != (6,):
        raise ValueError(f"totals: expected shape [6], got {list(totals_6.shape)}")
    values = [float(v) for v in totals_6.tolist()]
    return dict(zip(TERMS, values[:3], strict=True)), dict(zip(TERMS, values[3:], strict=True))


def resolve_totals(
    given: Totals | float | int | None, local: dict[str, torch.Tensor], name: str
) -> dict[str, float | torch.Tensor]:
    """Global totals when given (an int applies to every term), otherwise the local counts."""
    if given is None:
        return dict(local)
    if isinstance(given, (int, float)):
        return {k: float(given) for k in TERMS}
    missing = [k for k in TERMS if k not in given]
    if missing:
        raise ValueError(f"{name}: missing keys {missing} (expected {list(TERMS)})")
    return {k: given[k] for k in TERMS}
