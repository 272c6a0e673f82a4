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

from hpt_megatron.models.export import export_hf_weights, export_roles
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rollout.base import WeightBucket


class WeightSink(Protocol):
    """Where the driver puts the buckets: the engine, or a queue in front of it."""

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None: ...


def local_buckets(
    chunks: list[torch.nn.Module], hf: HFModelConfig, ctx: ParallelContext, bucket_bytes: int
) -> list:
    """This rank's export buckets (empty unless it is TP rank 0 of replica 0, or, for experts,
    expert TP rank 0 of expert replica 0: each expert-parallel rank sends its own experts)."""
    dense, experts = export_roles(ctx)
    if not (dense or experts):
        return []
    modules = [getattr(c, "module", c) for c in chunks]
    buckets = export_hf_weights(
        modules,
        hf,
        tp_group=ctx.tp_group if ctx.tp > 1 else None,
        etp_group=ctx.etp_group if ctx.etp > 1 else None,
        bucket_bytes=bucket_bytes,
        dense=dense,
        experts=experts,
    )
    return list(buckets)


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
