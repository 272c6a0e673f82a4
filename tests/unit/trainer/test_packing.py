"""Sequence packing (several sequences per row) and the micro-batch counts and token multiples
Megatron needs (virtual pipeline, FP8)."""

import math
import random

import pytest
import torch

from hpt_megatron.data.sample import Sample
from hpt_megatron.trainer.batching import (
    collate,
    collate_packed,
    microbatch_count_multiple,
    packed_efficiency,
    packed_microbatches,
    padding_efficiency,
    split_to_multiple,
    token_budget_microbatches,
    token_multiple,
)
from hpt_megatron.trainer.update import UpdateLayout, local_microbatches


def _long_tailed(n: int, median: int, seed: int) -> list[int]:
    """The distribution of benchmarks/microbatch_padding.py (lognormal, sigma 0.8, capped)."""
    rng = random.Random(seed)
    return [min(8192, max(1, round(rng.lognormvariate(math.log(median), 0.8)))) for _ in range(n)]


def _samples(lengths: list[int], seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        prompt = max(1, n // 3)
        out.append(
            Sample(
                prompt_id=str(i),
                group_id=i,
                prompt_ids=[rng.randrange(1, 50) for _ in range(prompt)],
                response_ids=[rng.randrange(1, 50) for _ in range(n - prompt)],
                advantage=rng.uniform(-1, 1),
                rollout_logprobs=[-rng.random() for _ in range(n - prompt)],
            )
        )
    return out


@pytest.mark.parametrize("budget", [16384, 32768])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packing_efficiency_on_the_long_tailed_benchmark_lengths(budget, seed):
    lengths = _long_tailed(1024, 1024, seed)
    batches = packed_microbatches(lengths, budget)
    assert sorted(i for b in batches for r in b for i in r) == list(range(len(lengths)))
    for rows in batches:
        width = max(sum(lengths[i] for i in r) for r in rows)
        assert len(rows) * width <= budget or (len(rows) == 1 and len(rows[0]) == 1)
    packed = packed_efficiency(lengths, batches)
    padded = padding_efficiency(lengths, token_budget_microbatches(lengths, budget))
    assert packed >= 0.99 and packed > padded


def test_collate_packed_matches_the_padded_rows_and_unpacks_back():
    samples = _samples([5, 9, 3, 7, 4])
    rows = [[1, 2], [3, 0], [4]]
    mb = collate_packed(samples, rows, pad_id=0, pad_to_multiple=4)
    ref = collate(samples, [1, 2, 3, 0, 4], pad_id=0, pad_to_multiple=4)
    # The loss sees exactly the padded rows.
    for name in ("input_ids_bs", "targets_bs", "loss_mask_bs", "advantages_bs"):
        assert torch.equal(getattr(mb, name), getattr(ref, name)), name
    assert mb.sample_index_b == [1, 2, 3, 0, 4]
    p = mb.packed
    assert p is not None and p.input_ids_pt.shape == (3, 12)  # longest row 9 + 3, multiple of 4
    assert p.position_ids_pt[0].tolist()[:12] == [*range(9), 0, 1, 2]
    assert mb.model_shape == (3, 12)
    # Each row's tokens, targets and positions are where the map says.
    flat_ids, flat_tg = p.input_ids_pt.reshape(-1), p.targets_pt.reshape(-1)
    for b in range(5):
        n = samples[mb.sample_index_b[b]].num_tokens
        src = p.source_bs[b, :n]
        assert torch.equal(flat_ids[src], ref.input_ids_bs[b, :n])
        assert torch.equal(flat_tg[src], ref.targets_bs[b, :n])
    # unpack(packed values) == the values the padded layout has at real tokens, 0 elsewhere.
    values_pt = torch.randn(3, 12)
    unpacked = p.unpack(values_pt)
    assert unpacked.shape == ref.input_ids_bs.shape
    assert torch.equal(unpacked[~p.valid_bs], torch.zeros(int((~p.valid_bs).sum())))
    assert torch.equal(unpacked[p.valid_bs], values_pt.reshape(-1)[p.source_bs[p.valid_bs]])


def test_packed_mask_is_block_diagonal_causal():
    samples = _samples([3, 2])
    mb = collate_packed(samples, [[0, 1]], pad_id=0, pad_to_multiple=8)
    assert mb.packed is not None
    seen = ~mb.packed.attention_mask_p1tt[0, 0]  # True where attention is allowed
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:3, 0:3] = torch.ones(3, 3, dtype=torch.bool).tril()
    expected[3:5, 3:5] = torch.ones(2, 2, dtype=torch.bool).tril()
    expected[5:8, 5:8] = torch.ones(3, 3, dtype=torch.bool).tril()  # trailing pads: their own
    assert torch.equal(seen, expected)


def test_split_to_multiple_splits_the_widest_and_stops_at_singletons():
    got = split_to_multiple([[0, 1, 2, 3], [4]], 4)
    assert len(got) == 4 and sorted(i for g in got for i in g) == list(range(5))
    assert split_to_multiple([[0], [1]], 4) == [[0], [1]]  # nothing left to split
    assert split_to_multiple([[0, 1], [2]], 1) == [[0, 1], [2]]


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("num", [1, 3, 10])
def test_virtual_pipeline_gets_a_multiple_of_pp_microbatches(packing, num):
    pp, vpp = 4, 2
    multiple = microbatch_count_multiple(pp, vpp)
    assert multiple == 4 and microbatch_count_multiple(pp, None) == 1
    samples = _samples([6 + (i * 5) % 11 for i in range(num)])
    layout = UpdateLayout(max_tokens=4096, microbatch_multiple=multiple, packing=packing)
    mbs = local_microbatches(samples, layout)
    assert len(mbs) % pp == 0 and len(mbs) >= pp
    # Every sample is trained exactly once; the make-up micro-batches weigh nothing.
    real = [i for mb in mbs if float(mb.rl_weight_b.sum()) > 0 for i in mb.sample_index_b]
    assert sorted(real) == list(range(num))
    fillers = [mb for mb in mbs if float(mb.rl_weight_b.sum()) == 0]
    assert all(
        float(mb.sft_weight_b.sum()) == 0 and float(mb.advantages_bs.abs().sum()) == 0
        for mb in fillers
    )


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_pads_every_microbatch_to_16_tokens_per_tp_rank(packing, tp):
    assert token_multiple(tp, fp8=False) == tp
    multiple = token_multiple(tp, fp8=True)
    assert multiple == 16 * tp
    samples = _samples([5, 9, 3, 17, 4, 40, 2])
    layout = UpdateLayout(max_tokens=64, pad_to_multiple=multiple, packing=packing)
    mbs = local_microbatches(samples, layout)
    assert len(mbs) > 1
    for mb in mbs:
        rows, width = mb.model_shape
        assert width % multiple == 0 and (rows * width // tp) % 16 == 0
        assert mb.input_ids_bs.shape[1] % multiple == 0
