"""Per-token values of whole rows, across micro-batches and ranks.

Shape legend: B rows of a micro-batch, S padded sequence length, T response tokens of a row.

Some inputs of the loss depend on every row of the step at once: advantages with the KL penalty
folded into the rewards (group statistics, whitening over the batch) and GAE over the critic's
values. The forwards that produce them run on each rank's own micro-batches; these helpers cut
their ``[B, S]`` outputs into per-row response vectors, gather the rows of all data-parallel
ranks (small: one float per response token), and write per-row vectors back into a rank's
micro-batches. A row is keyed by ``(mini-batch index, index in the mini-batch)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hpt_megatron.data.sample import Sample
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.trainer.batching import MicroBatch

RowKey = tuple[int, int]


def response_rows(values_bs: torch.Tensor, mb: MicroBatch) -> dict[int, torch.Tensor]:
    """``values_bs`` at each row's response positions: ``{sample index: [T]}``."""
    mask_bs = mb.loss_mask_bs.bool()
    return {idx: values_bs[row][mask_bs[row]] for row, idx in enumerate(mb.sample_index_b)}


def write_rows(target_bs: torch.Tensor, mb: MicroBatch, rows: dict[int, torch.Tensor]) -> None:
    """Inverse of :func:`response_rows`, in place, for the rows present in ``rows``."""
    mask_bs = mb.loss_mask_bs.bool()
    for row, idx in enumerate(mb.sample_index_b):
        if idx in rows:
            target_bs[row][mask_bs[row]] = rows[idx].to(target_bs.dtype)


def gather_rows(
    ctx: ParallelContext, local: dict[RowKey, torch.Tensor], contributes: bool
) -> dict[RowKey, torch.Tensor]:
    """Collective: every rank's ``local`` rows, merged, on every rank.

    Only ranks with ``contributes`` (one per row: the last pipeline stage, tensor rank 0, the
    row's data-parallel owner) send theirs.
    """
    mine = {k: v.detach().float().cpu().tolist() for k, v in local.items()} if contributes else {}
    if ctx.world_size == 1:
        return {k: torch.tensor(v) for k, v in mine.items()}
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine, group=ctx.cpu_group)
    return {k: torch.tensor(v) for part in gathered for k, v in part.items()}


def owns_rows(ctx: ParallelContext) -> bool:
    """Whether this rank's forward outputs are the ones to gather (one rank per row)."""
    return ctx.is_last_stage and ctx.tp_rank == 0


def padded(
    keys: list[RowKey], rows: dict[RowKey, torch.Tensor], minis: list[list[Sample]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values_bt, mask_bt)``: the rows of ``keys`` left-aligned and zero-padded (float64)."""
    lengths = [len(minis[k][i].response_ids) for k, i in keys]
    values_bt = torch.zeros(len(keys), max(lengths, default=1), dtype=torch.float64)
    mask_bt = torch.zeros_like(values_bt)
    for b, (key, length) in enumerate(zip(keys, lengths)):
        values = rows[key]
        if values.numel() != length:
            raise AssertionError(f"row {key}: {values.numel()} values for {length} tokens")
        values_bt[b, :length] = values.double()
        mask_bt[b, :length] = 1.0
    return values_bt, mask_bt
