"""The trainer's weights into the rollout engine: one pusher per run, chosen by the plan.

Every pipeline stage exports its own parameters (gathered over TP onto TP rank 0 of data-parallel
replica 0; with experts, each expert-parallel rank its own experts; see ``models/export.py``), and
every rank takes part in each push. One module per transport (``RolloutPlan.transport``):

- ``disk.py`` (SGLang servers): every exporting rank writes its shards into a versioned folder
  (``folder.py``: ``v<N>.tmp``, renamed when complete); the servers load it
  (``/update_weights_from_disk``).
- ``distributed.py`` + ``distributed_pusher.py`` (SGLang, ``weight_sync: distributed``): every
  exporting rank broadcasts its buckets into its own update group with the servers (gloo on
  CPU, NCCL on GPU), the stages in turn; nothing touches the disk.
- ``tensor.py`` (SGLang, ``weight_sync: tensor``, servers on the trainer's host): the same
  pusher without groups; each exporting rank posts handles to its buckets' memory (shared-memory
  files on CPU, CUDA IPC on GPU), the servers copy them in.
- ``memory.py`` (the in-process CPU engine): buckets over the CPU group, to the driver or, under
  data-parallel generation, to every rank's replica.

A transport implements :class:`WeightPusher` (``base.py``) on the trainer side and, for SGLang,
a :class:`WeightTransport` that the engine loads its servers with.
"""

from __future__ import annotations

from typing import Any

import torch

from hpt_megatron.models.export import DEFAULT_BUCKET_BYTES
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rollout.plan import RolloutPlan
from hpt_megatron.rollout.weight_sync.base import WeightPusher, WeightSink, WeightTransport
from hpt_megatron.rollout.weight_sync.disk import DiskPusher
from hpt_megatron.rollout.weight_sync.distributed_pusher import DistributedPusher
from hpt_megatron.rollout.weight_sync.memory import MemoryPusher

__all__ = ["WeightPusher", "WeightSink", "WeightTransport", "build_weight_pusher"]


def build_weight_pusher(
    plan: RolloutPlan,
    chunks: list[torch.nn.Module],
    hf: HFModelConfig,
    ctx: ParallelContext,
    tokenizer: Any = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> WeightPusher | None:
    """The run's pusher (``None`` when nothing is synced: a replay of recorded batches).
    ``tokenizer``: the driver's, copied into every disk version so it is a complete HF folder."""
    if plan.transport == "disk":
        assert plan.sync_dir is not None
        return DiskPusher(
            plan.sync_dir, chunks, hf, ctx, tokenizer=tokenizer, bucket_bytes=bucket_bytes
        )
    if plan.transport == "distributed" or plan.transport == "tensor":
        sglang = plan.rollout.sglang
        return DistributedPusher(
            chunks,
            hf,
            ctx,
            backend="gloo" if sglang.device == "cpu" else "nccl",
            timeout_s=sglang.weight_sync_timeout_s,
            kind=plan.transport,
            check=sglang.check_weights,
            bucket_bytes=bucket_bytes,
        )
    if plan.transport == "memory":
        every_rank = plan.every_rank_loads
        return MemoryPusher(chunks, hf, ctx, every_rank=every_rank, bucket_bytes=bucket_bytes)
    return None
