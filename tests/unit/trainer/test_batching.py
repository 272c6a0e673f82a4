"""Token-budget micro-batching and collation into padded tensors."""

import random

import pytest
import torch

from hpt_megatron.data.sample import RolloutBatch, Sample
from hpt_megatron.trainer.batching import (
    collate,
    collate_packed,
    fixed_count_microbatches,
    padding_efficiency,
    token_budget_microbatches,
)


def _lengths(n: int = 300, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(1, int(rng.lognormvariate(5.0, 0.8))) for _ in range(n)]


@pytest.mark.parametrize("max_tokens", [64, 500, 2048, 10**6])
def test_budget_respected_and_every_index_once(max_tokens):
    lengths = _lengths()
    batches = token_budget_microbatches(lengths, max_tokens)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(batches)
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        # Only a sequence longer than the whole budget may exceed it, and then it is alone.
        assert padded <= max_tokens or len(b) == 1, (b, padded)
    if max_tokens == 10**6:
        assert len(batches) == 1


def test_over_long_sequences_are_alone_and_the_rest_still_packs():
    lengths = [5, 100, 4, 120, 3, 6]
    batches = token_budget_microbatches(lengths, max_tokens=20)
    assert [1] in batches and [3] in batches
    assert sorted(i for b in batches for i in b) == list(range(6))
    rest = [b for b in batches if b not in ([1], [3])]
    assert len(rest) == 2  # 6,5,4 (3 x 6 = 18) then 3 alone: the budget does not fit a fourth
    assert all(len(b) * max(lengths[i] for i in b) <= 20 for b in rest)


def test_deterministic_with_ties_broken_by_index():
    lengths = [7, 3, 7, 3, 7, 3, 5, 5]
    first = token_budget_microbatches(lengths, 15)
    assert first == token_budget_microbatches(list(lengths), 15)
    assert first == [[0, 2], [4, 6], [7, 1, 3], [5]]


def test_budget_beats_fixed_count_on_long_tailed_lengths():
    lengths = _lengths(512, seed=1)
    budget = token_budget_microbatches(lengths, 4096)
    fixed = fixed_count_microbatches(len(lengths), -(-len(lengths) // len(budget)))
    assert padding_efficiency(lengths, budget) > 0.9
    assert padding_efficiency(lengths, budget) > padding_efficiency(lengths, fixed) + 0.2


def test_fixed_count_and_padding_efficiency_by_hand():
    assert fixed_count_microbatches(5, 2) == [[0, 1], [2, 3], [4]]
    lengths = [2, 4, 3]
    # [[0, 1], [2]]: 2 x 4 + 1 x 3 = 11 computed tokens for 9 real ones.
    assert padding_efficiency(lengths, [[0, 1], [2]]) == pytest.approx(9 / 11)
    # Rounded up to multiples of 4: 2 x 4 + 1 x 4 = 12.
    assert padding_efficiency(lengths, [[0, 1], [2]], multiple=4) == pytest.approx(9 / 12)


def _samples() -> list[Sample]:
    return [
        Sample(
            prompt_id="a",
            group_id=0,
            prompt_ids=[11, 12, 13],
            response_ids=[14, 15],
            rollout_logprobs=[-0.25, -0.5],
            advantage=0.5,
            rl_weight=1.0,
        ),
        Sample(
            prompt_id="b",
            group_id=1,
            prompt_ids=[21],
            response_ids=[22, 23, 24],
            rollout_logprobs=[-1.0, -2.0, -3.0],
            advantage=-1.5,
            rl_weight=0.5,
        ),
        Sample(
            prompt_id="c",
            group_id=2,
            prompt_ids=[31, 32],
            response_ids=[33],
            is_demo=True,
            rl_weight=0.0,
            sft_weight=1.0,
        ),
    ]


def test_collate_places_targets_mask_and_loss_inputs_at_response_positions():
    samples = _samples()
    mb = collate(samples, [1, 0], pad_id=0, pad_to_multiple=4)
    # Rows follow the given indices; 5 tokens rounded up to 8.
    assert mb.sample_index_b == [1, 0] and mb.num_rows == 2
    assert mb.input_ids_bs.tolist() == [
        [21, 22, 23, 24, 0, 0, 0, 0],
        [11, 12, 13, 14, 15, 0, 0, 0],
    ]
    # Position t predicts token t + 1.
    assert mb.targets_bs.tolist() == [
        [22, 23, 24, 0, 0, 0, 0, 0],
        [12, 13, 14, 15, 0, 0, 0, 0],
    ]
    # Sample b: prompt [21], response at token positions 1..3, predicted from positions 0..2.
    # Sample a: prompt [11, 12, 13], response at 3..4, predicted from 2..3.
    assert mb.loss_mask_bs.tolist() == [
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
    ]
    assert mb.rollout_logprobs_bs is not None
    assert mb.rollout_logprobs_bs.tolist() == [
        [-1.0, -2.0, -3.0, 0, 0, 0, 0, 0],
        [0, 0, -0.25, -0.5, 0, 0, 0, 0],
    ]
    assert mb.advantages_bs.tolist() == [
        [-1.5, -1.5, -1.5, 0, 0, 0, 0, 0],
        [0, 0, 0.5, 0.5, 0, 0, 0, 0],
    ]
    assert mb.rl_weight_b.tolist() == [0.5, 1.0] and mb.sft_weight_b.tolist() == [0.0, 0.0]
    assert mb.is_demo_b.tolist() == [False, False] and mb.old_logprobs_bs is None
    assert mb.position_ids_bs.tolist() == [list(range(8))] * 2
    assert mb.input_ids_bs.dtype == mb.targets_bs.dtype == torch.long
    # The masked targets are exactly the response tokens, in order.
    for row, idx in enumerate(mb.sample_index_b):
        picked = mb.targets_bs[row][mb.loss_mask_bs[row].bool()].tolist()
        assert picked == samples[idx].response_ids


def test_collate_without_padding_multiple_uses_the_longest():
    mb = collate(_samples(), [2], pad_id=-1)
    assert mb.input_ids_bs.tolist() == [[31, 32, 33]]
    assert mb.targets_bs.tolist() == [[32, 33, -1]]
    assert mb.loss_mask_bs.tolist() == [[0, 1, 0]]
    assert mb.is_demo_b.tolist() == [True] and mb.sft_weight_b.tolist() == [1.0]
    # A demonstration has no engine log-probs: zeros stand in (TIS never applies to demos).
    assert mb.rollout_logprobs_bs is not None and mb.rollout_logprobs_bs.tolist() == [[0, 0, 0]]


def test_collate_without_rollout_logprobs_on_an_on_policy_row_leaves_them_out():
    samples = [Sample(prompt_id="x", group_id=0, prompt_ids=[1], response_ids=[2, 3])]
    assert collate(samples, [0]).rollout_logprobs_bs is None


def _with_experts() -> list[Sample]:
    """_samples() with recorded experts (2 MoE layers, top-2) on the generated rows; the
    demonstration has none."""
    out = _samples()
    for k, sample in enumerate(out[:2]):
        n = sample.num_tokens - 1
        ids = (torch.arange(n * 4).view(n, 2, 2) + 10 * k) % 8
        sample.routed_experts = ids.to(torch.uint8)
    return out


def test_collate_places_the_recorded_experts_at_input_positions():
    samples = _with_experts()
    mb = collate(samples, [0, 1, 2], pad_to_multiple=8, routed_experts=True)
    experts = mb.routed_experts_bsmk
    assert experts is not None and experts.shape == (3, 8, 2, 2)
    for row, sample in enumerate(samples[:2]):
        n = sample.num_tokens - 1
        assert torch.equal(experts[row, :n], sample.routed_experts.long())
        assert (experts[row, n:] == -1).all()  # the last token and padding: routed as usual
    assert (experts[2] == -1).all()  # no record: the router's own choice
    assert collate(samples, [0, 1], routed_experts=False).routed_experts_bsmk is None
    assert collate(_samples(), [0, 1], routed_experts=True).routed_experts_bsmk is None


def test_packed_rows_carry_each_sequences_experts_to_its_tokens():
    samples = _with_experts()
    mb = collate_packed(samples, [[0, 2], [1]], routed_experts=True)
    assert mb.packed is not None and mb.model_routed_experts is mb.packed.routed_experts_ptmk
    packed = mb.packed.routed_experts_ptmk.flatten(0, 1)
    padded = mb.routed_experts_bsmk
    source, valid = mb.packed.source_bs, mb.packed.valid_bs
    assert torch.equal(packed[source[valid]], padded[valid])
    assert int((packed >= 0).all(-1).all(-1).sum()) == sum(s.num_tokens - 1 for s in samples[:2])


def test_routed_experts_survive_json_and_check_their_shape(tmp_path):
    samples = _with_experts()
    path = tmp_path / "batch.jsonl"
    RolloutBatch(samples, step=3).save_jsonl(path)
    back = RolloutBatch.load_jsonl(path).samples
    assert torch.equal(back[0].routed_experts, samples[0].routed_experts)
    assert back[0].routed_experts.dtype == torch.uint8 and back[2].routed_experts is None
    with pytest.raises(ValueError, match="routed_experts of shape"):
        Sample(
            prompt_id="x",
            group_id=0,
            prompt_ids=[1, 2],
            response_ids=[3],
            routed_experts=torch.zeros(3, 2, 2, dtype=torch.uint8),
        )
