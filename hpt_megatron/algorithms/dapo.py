"""DAPO's batch-side pieces (Yu et al. 2025): dynamic sampling and soft overlong punishment.

Shapes: B rows (responses), G groups.
"""

from __future__ import annotations

import torch

from hpt_megatron.algorithms._checks import Vector, as_vector, check_rewards, group_index


def dynamic_sampling_keep(*, rewards: Vector, group_ids: Vector) -> torch.Tensor:
    """``[B]`` bool: keep the rows of groups whose rewards are not all equal.

    Groups where every response is right (or every one wrong) have zero group-normalised
    advantage and no gradient; DAPO drops them and samples more prompts until the batch is full.
    A single-member group is all-equal and dropped.
    """
    rewards_b = check_rewards(rewards)
    group_ids_b = as_vector("group_ids", group_ids, torch.int64, rewards_b.shape[0])
    ids_g, inverse_b, _ = group_index(group_ids_b)
    num_g = ids_g.numel()
    max_g = torch.full((num_g,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse_b, rewards_b, "amax"
    )
    min_g = torch.full((num_g,), torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse_b, rewards_b, "amin"
    )
    return (max_g > min_g)[inverse_b]


def overlong_penalty(
    *, response_lengths: Vector, max_len: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment ``[B]`` (<= 0), added to the reward.

    0 up to ``max_len - buffer`` tokens, then falling linearly to -1 at ``max_len``, and -1
    beyond; times ``factor``.
    """
    if not 0 < buffer < max_len:
        raise ValueError(f"overlong_buffer: must be in (0, max_len={max_len}), got {buffer}")
    length_b = as_vector("response_lengths", response_lengths, torch.float64, None)
    start = max_len - buffer
    penalty_b = ((start - length_b) / buffer).clamp(min=-1.0, max=0.0)
    return factor * penalty_b
