"""Input checks shared by the algorithm functions: shapes, NaNs, group bookkeeping.

Shapes: B rows (responses), T response positions, G distinct groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Vector = torch.Tensor | Sequence[float] | Sequence[int] | Sequence[bool]


def as_vector(name: str, value: Vector, dtype: torch.dtype, batch: int | None) -> torch.Tensor:
    """``value`` as a 1-D tensor of ``dtype`` with ``batch`` entries (when given), or raise."""
    tensor = torch.as_tensor(value)
    if tensor.dim() != 1:
        raise ValueError(f"{name}: expected shape [B], got {list(tensor.shape)}")
    if batch is not None and tensor.shape[0] != batch:
        raise ValueError(f"{name}: expected {batch} entries (one per row), got {tensor.shape[0]}")
    return tensor.to(dtype)


def check_rewards(rewards_b: Vector, batch: int | None = None) -> torch.Tensor:
    """Rewards as float64 ``[B]``; NaN or infinite rewards raise, naming the rows."""
    rewards_b = as_vector("rewards", rewards_b, torch.float64, batch)
    bad = (~torch.isfinite(rewards_b)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rewards: rows {bad[:10]} are NaN or infinite (a grading failure?)")
    return rewards_b


def check_bt(name: str, tensor_bt: torch.Tensor | None, shape: torch.Size) -> None:
    """``tensor_bt`` must have exactly ``shape`` ([B, T])."""
    if tensor_bt is None:
        return
    if not isinstance(tensor_bt, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {list(shape)}, got {type(tensor_bt)}")
    if tensor_bt.shape != shape:
        raise ValueError(f"{name}: shape {list(tensor_bt.shape)} does not match {list(shape)}")


def check_mask(response_mask_bt: torch.Tensor) -> torch.Tensor:
    if not isinstance(response_mask_bt, torch.Tensor) or response_mask_bt.dim() != 2:
        shape = getattr(response_mask_bt, "shape", None)
        raise ValueError(f"response_mask: expected shape [B, T], got {shape}")
    return response_mask_bt


def group_index(group_ids_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique ids ``[G]`` sorted, row -> group index ``[B]``, members per group ``[G]``)."""
    ids_g, inverse_b, counts_g = torch.unique(group_ids_b, return_inverse=True, return_counts=True)
    return ids_g, inverse_b, counts_g


def require_group_size(ids_g: torch.Tensor, counts_g: torch.Tensor, need: int, why: str) -> None:
    small = (counts_g < need).nonzero().flatten()
    if small.numel():
        g = int(small[0])
        raise ValueError(
            f"group_ids: group {int(ids_g[g])} has {int(counts_g[g])} member(s); {why} needs at "
            f"least {need} per group ({small.numel()} such group(s))"
        )
