"""The trainer side of a step: shard the samples over data-parallel ranks, form token-budget
micro-batches, compute the loss denominators of the whole mini-batch, and adapt
``algorithms.policy_loss`` to the engine's per-micro-batch loss interface.

Shape legend: B rows of a micro-batch, S padded sequence length.
"""

from __future__ import annotations

import dataclasses

import torch

from hpt_megatron.algorithms import AlgorithmSpec, loss_totals, policy_loss, unpack_totals
from hpt_megatron.data.sample import Sample
from hpt_megatron.trainer.batching import MicroBatch, collate, token_budget_microbatches


def dp_shards(samples: list[Sample], dp: int) -> list[list[int]]:
    """Balance tokens over ``dp`` ranks (longest first, to the least loaded); deterministic."""
    loads = [0] * dp
    shards: list[list[int]] = [[] for _ in range(dp)]
    for idx in sorted(range(len(samples)), key=lambda i: (-samples[i].num_tokens, i)):
        rank = min(range(dp), key=lambda r: (loads[r], r))
        shards[rank].append(idx)
        loads[rank] += samples[idx].num_tokens
    return [sorted(s) for s in shards]


def _padding_row(sample: Sample) -> Sample:
    """A copy that belongs to no loss term: keeps a rank with no data in the collective step."""
    return dataclasses.replace(sample, rl_weight=0.0, sft_weight=0.0, metadata={"padding": True})


def build_microbatches(
    samples: list[Sample],
    advantages_b: torch.Tensor,
    *,
    dp: int,
    max_tokens: int,
    pad_id: int,
    pad_to_multiple: int,
) -> list[list[MicroBatch]]:
    """Micro-batches of every data-parallel rank (index = DP rank), with the loss inputs."""
    rows = list(samples)
    advantages = advantages_b.tolist()
    shards = dp_shards(rows, dp)
    for shard in shards:
        if not shard:  # fewer rows than ranks: this rank trains on a zero-weight copy
            rows.append(_padding_row(rows[0]))
            advantages.append(0.0)
            shard.append(len(rows) - 1)
    token_fields = {
        "advantages": [[advantages[i]] * len(s.response_ids) for i, s in enumerate(rows)],
    }
    if all(s.rollout_logprobs is not None or s.is_demo for s in rows):
        token_fields["rollout_logprobs"] = [
            s.rollout_logprobs if s.rollout_logprobs is not None else [0.0] * len(s.response_ids)
            for s in rows
        ]
    seq_fields = {
        "is_demo": [float(s.is_demo) for s in rows],
        "rl_weight": [s.rl_weight for s in rows],
        "sft_weight": [s.sft_weight for s in rows],
    }
    result = []
    for shard in shards:
        lengths = [rows[i].num_tokens for i in shard]
        result.append(
            [
                collate(
                    rows,
                    [shard[j] for j in group],
                    pad_id=pad_id,
                    pad_to_multiple=pad_to_multiple,
                    token_fields=token_fields,
                    seq_fields=seq_fields,
                )
                for group in token_budget_microbatches(lengths, max_tokens)
            ]
        )
    return result


def global_totals(spec: AlgorithmSpec, all_shards: list[list[MicroBatch]]) -> tuple:
    """Loss denominators of the whole mini-batch (every rank holds every shard: no collective)."""
    total = torch.zeros(6, dtype=torch.float64)
    for shard in all_shards:
        for mb in shard:
            total += loss_totals(
                spec,
                response_mask=mb.loss_mask_bs,
                is_demo=mb.seq_fields["is_demo"].bool(),
                rl_weight=mb.seq_fields["rl_weight"],
                sft_weight=mb.seq_fields["sft_weight"],
            )
    return unpack_totals(total)


class PolicyLossFn:
    """The engine's ``MicroBatchLoss`` over ``algorithms.policy_loss``.

    ``old_logprobs`` come from the micro-batch when the trainer recomputed them; otherwise the
    current log-probs, detached, stand in (one update per step: pi_old == pi_theta exactly).
    """

    def __init__(self, spec: AlgorithmSpec, totals: tuple, dp: int) -> None:
        self.spec = spec
        self.num_tokens, self.num_seqs = totals
        self.dp = dp

    def __call__(
        self, logprobs_bs: torch.Tensor, entropy_bs: torch.Tensor, mb: MicroBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = logprobs_bs.device
        tok = {k: v.to(device) for k, v in mb.token_fields.items()}
        seq = {k: v.to(device) for k, v in mb.seq_fields.items()}
        old = tok.get("old_logprobs", logprobs_bs.detach())
        entropy = entropy_bs if self.spec.entropy_coef else entropy_bs.detach()
        loss, metrics = policy_loss(
            self.spec,
            logprobs=logprobs_bs,
            old_logprobs=old,
            advantages=tok["advantages"],
            response_mask=mb.loss_mask_bs.to(device),
            entropy=entropy,
            is_demo=seq["is_demo"].bool(),
            rl_weight=seq["rl_weight"],
            sft_weight=seq["sft_weight"],
            rollout_logprobs=tok.get("rollout_logprobs"),
            global_num_tokens=self.num_tokens,
            global_num_seqs=self.num_seqs,
            dp_world_size=self.dp,
        )
        return loss, metrics


def attach_old_logprobs(
    microbatches: list[MicroBatch], outputs: list[tuple[torch.Tensor, torch.Tensor]] | None
) -> None:
    """Store recomputed log-probs in each micro-batch (last pipeline stage only)."""
    if outputs is None:
        return
    for mb, (logprobs_bs, _) in zip(microbatches, outputs):
        mb.token_fields["old_logprobs"] = logprobs_bs.float() * mb.loss_mask_bs
