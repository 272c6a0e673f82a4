"""Push the trainer's weights into the rollout engine after a step.

The engine lives on the driver rank. Every pipeline stage exports its own parameters (gathered
over TP onto TP rank 0 of data-parallel replica 0, see ``models/export.py``); the buckets travel
to the driver over the CPU group and are loaded in place. With an in-process CPU engine the driver
holds one full copy of the policy while loading, as the engine itself does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
import torch.distributed as dist

from hpt_megatron.models.export import rank_export_buckets
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rollout.base import WeightBucket


class WeightSink(Protocol):
    """Where the driver puts the buckets: the engine, or a queue in front of it."""

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None: ...


def local_buckets(
    chunks: list[torch.nn.Module], hf: HFModelConfig, ctx: ParallelContext, bucket_bytes: int
) -> list:
    """This rank's export buckets (``models.export.rank_export_buckets``), materialised."""
    modules = [getattr(c, "module", c) for c in chunks]
    return list(rank_export_buckets(modules, hf, ctx, bucket_bytes))


def sync_weights(
    engine: WeightSink | None,
    chunks: list[torch.nn.Module],
    hf: HFModelConfig,
    ctx: ParallelContext,
    version: int,
    bucket_bytes: int = 512 * 1024**2,
) -> int:
    """Collective over all ranks; the driver's ``engine`` receives every bucket. Returns bytes."""
    mine = local_buckets(chunks, hf, ctx, bucket_bytes)
    gathered: list[Any] = [mine]
    if ctx.world_size > 1:
        gathered = [None] * ctx.world_size
        dist.gather_object(mine, gathered if ctx.is_driver else None, dst=0, group=ctx.cpu_group)
    if not ctx.is_driver:
        return 0
    buckets = [bucket for rank_buckets in gathered for bucket in rank_buckets]
    assert engine is not None
    engine.update_weights(buckets, version)
    return sum(t.numel() * t.element_size() for bucket in buckets for _, t in bucket)
