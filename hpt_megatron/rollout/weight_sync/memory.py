"""Weights in memory, for the in-process CPU engine (which holds the whole model anyway).

Every rank's export buckets travel to the driver over the CPU group and are loaded in place;
under data-parallel generation (``every_rank``: each rank holds a replica,
``rollout/replicas.py``) they travel to every rank, and each loads its own replica.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hpt_megatron.models.export import DEFAULT_BUCKET_BYTES, rank_export_buckets
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rollout.weight_sync.base import WeightSink


class MemoryPusher:
    """Buckets gathered onto the driver, or onto every rank (``every_rank``).

    Args:
        chunks: the policy's model chunks (wrapped or not).
        hf: the policy's HF config (the export's names and layout).
        ctx: this rank's parallel context.
        every_rank: every rank loads the weights into its own sink.
        bucket_bytes: the export's bucket size.
    """

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        hf: HFModelConfig,
        ctx: ParallelContext,
        *,
        every_rank: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self.modules = [getattr(c, "module", c) for c in chunks]
        self.hf = hf
        self.ctx = ctx
        self.every_rank = every_rank
        self.bucket_bytes = bucket_bytes

    def push(self, version: int, sink: WeightSink | None) -> int:
        """Collective: this rank's buckets to the loading ranks, loaded into their ``sink``."""
        ctx = self.ctx
        mine = list(rank_export_buckets(self.modules, self.hf, ctx, self.bucket_bytes))
        gathered: list[Any] = [mine]
        if ctx.world_size > 1:
            gathered = [None] * ctx.world_size
            if self.every_rank:
                dist.all_gather_object(gathered, mine, group=ctx.cpu_group)
            else:
                dst_list = gathered if ctx.is_driver else None
                dist.gather_object(mine, dst_list, dst=0, group=ctx.cpu_group)
        if not (ctx.is_driver or self.every_rank):
            return 0
        buckets = [bucket for rank_buckets in gathered for bucket in rank_buckets]
        assert sink is not None
        sink.update_weights(buckets, version)
        return sum(t.numel() * t.element_size() for bucket in buckets for _, t in bucket)

    def close(self) -> None:
        """Nothing held: the buckets went with each push."""
