"""Micro-batches formed by a token budget, and their collation into padded tensors.

Shape legend: B sequences in a micro-batch, S padded sequence length.

Sequences are sorted by length and cut into micro-batches whose padded size (count x longest)
stays within ``max_tokens``, so the padding inside a micro-batch is small (dynamic batch size).
Right padding with a causal mask never lets a real token see a pad token, so no attention mask is
needed; the loss masks pads out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpt_megatron.data.sample import Sample


def token_budget_microbatches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``max_tokens`` padded tokens.

    A sequence longer than the budget gets a micro-batch of its own. The result is deterministic
    (ties broken by index) so every rank of a model-parallel group forms the same micro-batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for idx in order:
        longest_if_added = max(longest, lengths[idx])
        if current and longest_if_added * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest_if_added = [], lengths[idx]
        current.append(idx)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def fixed_count_microbatches(num: int, micro_batch_size: int) -> list[list[int]]:
    """The baseline: consecutive groups of ``micro_batch_size`` sequences."""
    return [list(range(i, min(i + micro_batch_size, num))) for i in range(0, num, micro_batch_size)]


def padding_efficiency(lengths: list[int], batches: list[list[int]], multiple: int = 1) -> float:
    """Real tokens / computed tokens of a micro-batching."""
    real = sum(lengths)
    computed = sum(len(b) * _round_up(max(lengths[i] for i in b), multiple) for b in batches)
    return real / computed


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class MicroBatch:
    """Padded tensors of one micro-batch; per-token fields are aligned with ``targets_bs``.

    Position t of every per-token tensor describes the prediction of token t + 1 from tokens
    ``<= t``; ``loss_mask_bs`` is 1 where that token is a response token. The loss inputs come from
    the samples: ``advantages_bs`` (each row's advantage on its response tokens),
    ``rollout_logprobs_bs`` (when every row has the engine's log-probs or is a demonstration), and
    ``old_logprobs_bs`` / ``ref_logprobs_bs``, set by the update when it computes them.
    """

    input_ids_bs: torch.Tensor
    position_ids_bs: torch.Tensor
    targets_bs: torch.Tensor
    loss_mask_bs: torch.Tensor
    sample_index_b: list[int]  # index of each row in the list the micro-batch was collated from
    advantages_bs: torch.Tensor
    is_demo_b: torch.Tensor  # bool
    rl_weight_b: torch.Tensor
    sft_weight_b: torch.Tensor
    rollout_logprobs_bs: torch.Tensor | None = None
    old_logprobs_bs: torch.Tensor | None = None
    ref_logprobs_bs: torch.Tensor | None = None  # set by the update when a KL term is on
    old_values_bs: torch.Tensor | None = None  # the critic's values before its update (gae)
    returns_bs: torch.Tensor | None = None  # GAE returns, the critic's targets

    @property
    def num_rows(self) -> int:
        return self.input_ids_bs.shape[0]


def collate(
    samples: list[Sample], indices: list[int], *, pad_id: int = 0, pad_to_multiple: int = 1
) -> MicroBatch:
    """Pad ``samples[indices]`` into a :class:`MicroBatch`, with each sample's loss inputs."""
    rows = [samples[i] for i in indices]
    seq_len = _round_up(max(s.num_tokens for s in rows), pad_to_multiple)
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    advantages = torch.zeros(shape, dtype=torch.float32)
    with_rollout = all(s.rollout_logprobs is not None or s.is_demo for s in rows)
    rollout = torch.zeros(shape, dtype=torch.float32) if with_rollout else None
    for row, sample in enumerate(rows):
        ids = sample.prompt_ids + sample.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        start, end = len(sample.prompt_ids) - 1, len(ids) - 1  # predicting response tokens
        loss_mask[row, start:end] = 1.0
        advantages[row, start:end] = sample.advantage
        if rollout is not None and sample.rollout_logprobs is not None:
            rollout[row, start:end] = torch.tensor(sample.rollout_logprobs, dtype=torch.float32)
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    targets[:, -1] = pad_id
    positions = torch.arange(seq_len).unsqueeze(0).expand(len(rows), -1).contiguous()
    return MicroBatch(
        input_ids_bs=input_ids,
        position_ids_bs=positions,
        targets_bs=targets,
        loss_mask_bs=loss_mask,
        sample_index_b=list(indices),
        advantages_bs=advantages,
        is_demo_b=torch.tensor([s.is_demo for s in rows], dtype=torch.bool),
        rl_weight_b=torch.tensor([s.rl_weight for s in rows], dtype=torch.float32),
        sft_weight_b=torch.tensor([s.sft_weight for s in rows], dtype=torch.float32),
        rollout_logprobs_bs=rollout,
    )
