"""Per-row response values cut from and written back into micro-batches, and padded."""

import torch

from hpt_megatron.data.sample import Sample
from hpt_megatron.trainer.batching import collate
from hpt_megatron.trainer.rows import padded, response_rows, write_rows


def _samples() -> list[Sample]:
    return [
        Sample(prompt_id="a", group_id=0, prompt_ids=[1, 2, 3], response_ids=[4, 5]),
        Sample(prompt_id="b", group_id=0, prompt_ids=[1], response_ids=[6, 7, 8, 9]),
    ]


def test_response_rows_round_trip():
    samples = _samples()
    mb = collate(samples, [1, 0])
    values_bs = torch.arange(mb.loss_mask_bs.numel(), dtype=torch.float32).view_as(mb.loss_mask_bs)
    rows = response_rows(values_bs, mb)
    assert sorted(rows) == [0, 1]
    assert [len(rows[i]) for i in (0, 1)] == [2, 4]  # one value per response token
    # Row 0 of the micro-batch is sample 1: its response positions are 0..3 (prompt of one).
    assert rows[1].tolist() == values_bs[0, 0:4].tolist()
    target = torch.zeros_like(values_bs)
    write_rows(target, mb, {0: torch.tensor([7.0, 8.0])})
    assert target[1].tolist()[2:4] == [7.0, 8.0] and target.sum() == 15.0


def test_padded_left_aligns_rows():
    minis = [_samples()]
    rows = {(0, 0): torch.tensor([1.0, 2.0]), (0, 1): torch.tensor([3.0, 4.0, 5.0, 6.0])}
    values_bt, mask_bt = padded([(0, 1), (0, 0)], rows, minis)
    assert values_bt.tolist() == [[3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 0.0, 0.0]]
    assert mask_bt.sum(-1).tolist() == [4.0, 2.0]
