"""Micro-batches formed by a token budget, and their collation into padded or packed tensors.

Shape legend: B sequences in a micro-batch, S padded sequence length; P packed rows of T tokens.

Sequences are sorted by length and cut into micro-batches whose padded size (count x longest)
stays within ``max_tokens``, so the padding inside a micro-batch is small (dynamic batch size).
Right padding with a causal mask never lets a real token see a pad token, so no attention mask is
needed; the loss masks pads out.

With packing (:func:`packed_microbatches`), several sequences share one row of T tokens (first-fit
decreasing into rows as long as the longest sequence), and rows are grouped into micro-batches by
the same token budget. The model sees the :class:`PackedRows` (positions restart per sequence, a
block-diagonal causal mask); the loss still sees one row per sample: the log-probs are gathered
back to ``[B, S]`` by :meth:`PackedRows.unpack`.

:func:`microbatch_count_multiple` and :func:`token_multiple` are what Megatron needs of the
micro-batching beyond the budget: a count divisible by PP under a virtual pipeline (the
interleaved schedule refuses fewer, or a remainder), and token counts divisible by 16 under FP8.
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


def packed_microbatches(lengths: list[int], max_tokens: int) -> list[list[list[int]]]:
    """Micro-batches -> packed rows -> sequence indices, for packing.

    Rows hold at most ``min(max_tokens, longest)`` tokens, filled first-fit by decreasing length
    (a sequence longer than the budget gets a row of its own); the rows are then grouped into
    micro-batches of at most ``max_tokens`` padded tokens by :func:`token_budget_microbatches`.
    Deterministic, like it.
    """
    capacity = min(max_tokens, max(lengths))
    rows: list[list[int]] = []
    loads: list[int] = []
    for idx in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, load in enumerate(loads):
            if load + lengths[idx] <= capacity:
                rows[r].append(idx)
                loads[r] += lengths[idx]
                break
        else:
            rows.append([idx])
            loads.append(lengths[idx])
    return [[rows[r] for r in group] for group in token_budget_microbatches(loads, max_tokens)]


def split_to_multiple(groups: list[list], multiple: int) -> list[list]:
    """Split the largest groups in two until their count is a multiple of ``multiple``.

    Returns fewer than a multiple only when every group is down to one element; the caller
    then adds filler micro-batches (see ``trainer.update.local_microbatches``).
    """
    groups = [list(g) for g in groups]
    while len(groups) % multiple:
        widest = max(range(len(groups)), key=lambda i: (len(groups[i]), -i))
        if len(groups[widest]) < 2:
            break
        group = groups.pop(widest)
        half = len(group) // 2
        groups[widest:widest] = [group[:half], group[half:]]
    return groups


def microbatch_count_multiple(pp: int, vpp: int | None) -> int:
    """Micro-batches per step must be a multiple of this: PP under a virtual pipeline.

    Megatron's interleaved schedule takes micro-batches in groups of PP per virtual stage and
    refuses a count below PP or one leaving a remainder group smaller than PP.
    """
    return pp if vpp is not None else 1


def token_multiple(tp: int, fp8: bool) -> int:
    """Sequence lengths are padded to a multiple of this: TP (sequence-parallel shards), and with
    FP8 16 tokens per TP rank (Transformer Engine's FP8 GEMMs need dimensions divisible by 16)."""
    return 16 * tp if fp8 else tp


def packed_efficiency(
    lengths: list[int], batches: list[list[list[int]]], multiple: int = 1
) -> float:
    """Real tokens / computed tokens of a packed micro-batching (rows padded to the longest)."""
    computed = 0
    for rows in batches:
        longest = max(sum(lengths[i] for i in row) for row in rows)
        computed += len(rows) * _round_up(longest, multiple)
    return sum(lengths) / computed


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
class PackedRows:
    """The model's input of a packed micro-batch, and the map back to the loss's rows.

    ``attention_mask_p1tt`` is True where attention is masked (Megatron's convention): a token
    sees the earlier tokens of its own sequence only. ``source_bs`` is the flat index
    ``p * T + t`` of row b's position s in the packed tensors; ``valid_bs`` marks the positions
    that hold a token of row b (the rest unpack to 0, as the loss mask covers none of them).
    """

    input_ids_pt: torch.Tensor
    position_ids_pt: torch.Tensor
    targets_pt: torch.Tensor
    attention_mask_p1tt: torch.Tensor
    source_bs: torch.Tensor
    valid_bs: torch.Tensor
    routed_experts_ptmk: torch.Tensor | None = None  # routing replay, as MicroBatch's

    def unpack(self, values_pt: torch.Tensor) -> torch.Tensor:
        """``[P, T]`` per-token values -> ``[B, S]`` aligned with the micro-batch's rows."""
        source = self.source_bs.to(values_pt.device)
        gathered = values_pt.reshape(-1)[source.reshape(-1)].view(source.shape)
        return torch.where(self.valid_bs.to(values_pt.device), gathered, 0.0)


@dataclass
class MicroBatch:
    """Padded tensors of one micro-batch; per-token fields are aligned with ``targets_bs``.

    Position t of every per-token tensor describes the prediction of token t + 1 from tokens
    ``<= t``; ``loss_mask_bs`` is 1 where that token is a response token. The loss inputs come from
    the samples: ``advantages_bs`` (each row's advantage on its response tokens),
    ``rollout_logprobs_bs`` (when every row has the engine's log-probs or is a demonstration), and
    ``old_logprobs_bs`` / ``ref_logprobs_bs``, set by the update when it computes them. ``packed``,
    when set, is what the model runs on instead of ``input_ids_bs``/``position_ids_bs`` (see
    :func:`collate_packed`). ``routed_experts_bsmk`` (routing replay): the rollout engine's
    experts of each input token ``[B, S, MoE layers, k]``, -1 where there are none (demonstrations,
    each sequence's last token, padding: the router's own choice there).
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
    teacher_logprobs_bs: torch.Tensor | None = None  # a teacher's servers' (Sample's) scores
    old_values_bs: torch.Tensor | None = None  # the critic's values before its update (gae)
    returns_bs: torch.Tensor | None = None  # GAE returns, the critic's targets
    packed: PackedRows | None = None
    routed_experts_bsmk: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.input_ids_bs.shape[0]

    @property
    def model_shape(self) -> tuple[int, int]:
        """``(rows, tokens per row)`` of what the model runs on."""
        ids = self.input_ids_bs if self.packed is None else self.packed.input_ids_pt
        return ids.shape[0], ids.shape[1]

    @property
    def model_routed_experts(self) -> torch.Tensor | None:
        """The replayed experts in the layout the model runs on (packed rows when packed)."""
        return self.routed_experts_bsmk if self.packed is None else self.packed.routed_experts_ptmk


def routed_experts_tensor(rows: list[Sample], seq_len: int) -> torch.Tensor | None:
    """``[len(rows), seq_len, MoE layers, k]`` expert ids of the rows, -1 where not recorded;
    None when no row has any."""
    recorded = [s.routed_experts for s in rows if s.routed_experts is not None]
    if not recorded:
        return None
    shape = tuple(recorded[0].shape[1:])
    out = torch.full((len(rows), seq_len, *shape), -1, dtype=torch.long)
    for row, sample in enumerate(rows):
        experts = sample.routed_experts
        if experts is None:
            continue
        if tuple(experts.shape[1:]) != shape:
            raise ValueError(
                f"sample {sample.prompt_id}: routed_experts for {tuple(experts.shape[1:])} "
                f"(MoE layers, top-k), other rows have {shape}"
            )
        out[row, : experts.shape[0]] = experts.long()
    return out


def collate(
    samples: list[Sample],
    indices: list[int],
    *,
    pad_id: int = 0,
    pad_to_multiple: int = 1,
    routed_experts: bool = False,
) -> MicroBatch:
    """Pad ``samples[indices]`` into a :class:`MicroBatch`, with each sample's loss inputs
    (and, with ``routed_experts``, the experts the rollout engine chose, for routing replay)."""
    rows = [samples[i] for i in indices]
    seq_len = _round_up(max(s.num_tokens for s in rows), pad_to_multiple)
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    advantages = torch.zeros(shape, dtype=torch.float32)
    with_rollout = all(s.rollout_logprobs is not None or s.is_demo for s in rows)
    rollout = torch.zeros(shape, dtype=torch.float32) if with_rollout else None
    with_teacher = any(s.teacher_logprobs is not None for s in rows)
    teacher = torch.zeros(shape, dtype=torch.float32) if with_teacher else None
    for row, sample in enumerate(rows):
        ids = sample.prompt_ids + sample.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        start, end = len(sample.prompt_ids) - 1, len(ids) - 1  # predicting response tokens
        loss_mask[row, start:end] = 1.0
        advantages[row, start:end] = sample.advantage
        if rollout is not None and sample.rollout_logprobs is not None:
            rollout[row, start:end] = torch.tensor(sample.rollout_logprobs, dtype=torch.float32)
        if teacher is not None and sample.teacher_logprobs is not None:
            teacher[row, start:end] = torch.tensor(sample.teacher_logprobs, dtype=torch.float32)
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
        teacher_logprobs_bs=teacher,
        routed_experts_bsmk=routed_experts_tensor(rows, seq_len) if routed_experts else None,
    )


def collate_packed(
    samples: list[Sample],
    rows: list[list[int]],
    *,
    pad_id: int = 0,
    pad_to_multiple: int = 1,
    routed_experts: bool = False,
) -> MicroBatch:
    """:func:`collate` of the sequences of ``rows`` (packed rows of sample indices), with the
    packed layout the model runs on: each row's sequences back to back, positions restarting at
    each, a block-diagonal causal mask, and each sequence's last target a pad (as padded)."""
    indices = [i for row in rows for i in row]
    mb = collate(
        samples,
        indices,
        pad_id=pad_id,
        pad_to_multiple=pad_to_multiple,
        routed_experts=routed_experts,
    )
    seq_len = mb.input_ids_bs.shape[1]
    width = _round_up(max(sum(samples[i].num_tokens for i in row) for row in rows), pad_to_multiple)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)  # trailing pads: a segment of their own
    source = torch.zeros((len(indices), seq_len), dtype=torch.long)
    valid = torch.zeros((len(indices), seq_len), dtype=torch.bool)
    b = 0
    for p, row in enumerate(rows):
        offset = 0
        for idx in row:
            sample = samples[idx]
            n = sample.num_tokens
            ids = torch.tensor(sample.prompt_ids + sample.response_ids, dtype=torch.long)
            input_ids[p, offset : offset + n] = ids
            targets[p, offset : offset + n - 1] = ids[1:]
            positions[p, offset : offset + n] = torch.arange(n)
            segment[p, offset : offset + n] = b
            source[b, :n] = p * width + offset + torch.arange(n)
            valid[b, :n] = True
            offset += n
            b += 1
    pad = segment < 0
    positions[pad] = (torch.arange(width).expand(shape) - (width - pad.sum(1, keepdim=True)))[pad]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    mb.packed = PackedRows(
        input_ids_pt=input_ids,
        position_ids_pt=positions,
        targets_pt=targets,
        attention_mask_p1tt=~(same & causal).unsqueeze(1),
        source_bs=source,
        valid_bs=valid,
    )
    if mb.routed_experts_bsmk is not None:  # each sequence's tokens to their packed places
        experts = mb.routed_experts_bsmk
        packed = torch.full((len(rows) * width, *experts.shape[2:]), -1, dtype=torch.long)
        packed[source[valid]] = experts[valid]
        mb.packed.routed_experts_ptmk = packed.view(len(rows), width, *experts.shape[2:])
    return mb
