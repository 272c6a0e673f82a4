"""Push the trainer's weights into the rollout engine after a step.

Every pipeline stage exports its own parameters (gathered over TP onto TP rank 0 of data-parallel
replica 0; with experts, each expert-parallel rank its own experts; see ``models/export.py``).
Two ways to the engine, chosen by the engine kind (every rank knows it from the config):

- **Disk** (SGLang servers, :class:`DiskSync`): each exporting rank writes its own safetensors
  shards straight into ``<root>/v<version>.tmp``, bucket by bucket, so no rank holds more than its
  own stage's buckets plus one bucket in flight; after a barrier the driver writes the index
  (from the shard names every rank reports: small metadata), config.json and the tokenizer
  files, renames the folder to ``v<version>`` and asks the engine to load it on every server.
  The engine's disk transport removes older versions once a newer one is loaded
  (``rollout/sglang/weight_sync/disk.py``).
- **Buckets in memory** (the in-process CPU engine, which holds the whole model anyway): the
  buckets travel to the driver over the CPU group and are loaded in place; under data-parallel
  generation (``every_rank``: each rank holds a replica, ``rollout/replicas.py``) they travel to
  every rank, and each loads its own replica.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.distributed as dist

from hpt_megatron.models.export import (
    DEFAULT_BUCKET_BYTES,
    merge_shard_index,
    rank_export_buckets,
    write_rank_shards,
)
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.hf_io import copy_side_files, write_config
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rollout.base import WeightBucket

if TYPE_CHECKING:
    from hpt_megatron.config import HPTConfig

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class WeightSink(Protocol):
    """Where the driver puts the weights: the engine, or a queue in front of it."""

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None: ...

    def update_weights_from_disk(self, path: str | Path, version: int) -> None: ...


@dataclass
class DiskSync:
    """Where disk weight sync writes: ``root/v<version>`` (a path every rank can write).

    ``tokenizer`` (the driver's) is saved once under ``root/tokenizer`` and its files copied into
    every version folder, so each one is a complete HF folder a server can start from.
    """

    root: Path
    tokenizer: Any = None

    def describe(self, folder: Path, hf: HFModelConfig, torch_dtype: str) -> None:
        """(driver) config.json and the tokenizer files next to the shards in ``folder``."""
        write_config(hf, folder, torch_dtype=torch_dtype)
        if self.tokenizer is None:
            return
        saved = self.root / "tokenizer"
        if not saved.is_dir():
            self.tokenizer.save_pretrained(str(saved))
        copy_side_files(saved, folder)


def disk_sync_for(cfg: HPTConfig, tokenizer: Any = None) -> DiskSync | None:
    """The run's disk sync target (SGLang servers), or ``None`` (the in-process CPU engine
    takes tensors). Same folder as the engine's transport: ``rollout.sglang.weight_sync_dir``,
    by default ``<run_dir>/rollout_weights``."""
    if cfg.rollout.engine != "sglang":
        return None
    return DiskSync(cfg.rollout.sglang.sync_dir(cfg.run.run_dir), tokenizer)


def sync_weights(
    sink: WeightSink | None,
    chunks: list[torch.nn.Module],
    hf: HFModelConfig,
    ctx: ParallelContext,
    version: int,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    disk: DiskSync | None = None,
    every_rank: bool = False,
) -> int:
    """Collective over all ranks: the trainer's weights as ``version`` into the driver's ``sink``
    (through files under ``disk`` when given; with ``every_rank``, into each rank's own
    ``sink``, its engine replica). Returns the bytes exported (on the ranks with a sink)."""
    modules = [getattr(c, "module", c) for c in chunks]
    if disk is not None:
        return _sync_by_disk(sink, modules, hf, ctx, version, bucket_bytes, disk)
    return _sync_in_memory(sink, modules, hf, ctx, version, bucket_bytes, every_rank)


def _sync_by_disk(
    sink: WeightSink | None,
    modules: list[torch.nn.Module],
    hf: HFModelConfig,
    ctx: ParallelContext,
    version: int,
    bucket_bytes: int,
    disk: DiskSync,
) -> int:
    tmp = disk.root / f"v{version}.tmp"
    if ctx.is_driver:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed run's partial folder
        tmp.mkdir(parents=True)
    if ctx.world_size > 1:
        dist.barrier(group=ctx.cpu_group)  # the folder exists before anyone writes into it
    mine = write_rank_shards(modules, hf, tmp, ctx, bucket_bytes=bucket_bytes)
    total = merge_shard_index(tmp, ctx, mine)  # a barrier: every rank's shards are on disk
    if not ctx.is_driver:
        return 0
    disk.describe(tmp, hf, _DTYPE_NAMES[cast(Any, modules[0]).config.params_dtype])
    final = disk.root / f"v{version}"
    shutil.rmtree(final, ignore_errors=True)  # a version written again (a resumed run)
    tmp.rename(final)
    assert sink is not None
    sink.update_weights_from_disk(final, version)
    return total


def _sync_in_memory(
    sink: WeightSink | None,
    modules: list[torch.nn.Module],
    hf: HFModelConfig,
    ctx: ParallelContext,
    version: int,
    bucket_bytes: int,
    every_rank: bool,
) -> int:
    """Every rank's buckets gathered onto the driver, or onto every rank (``every_rank``)."""
    mine = list(rank_export_buckets(modules, hf, ctx, bucket_bytes))
    gathered: list[Any] = [mine]
    if ctx.world_size > 1:
        gathered = [None] * ctx.world_size
        if every_rank:
            dist.all_gather_object(gathered, mine, group=ctx.cpu_group)
        else:
            dst_list = gathered if ctx.is_driver else None
            dist.gather_object(mine, dst_list, dst=0, group=ctx.cpu_group)
    if not (ctx.is_driver or every_rank):
        return 0
    buckets = [bucket for rank_buckets in gathered for bucket in rank_buckets]
    assert sink is not None
    sink.update_weights(buckets, version)
    return sum(t.numel() * t.element_size() for bucket in buckets for _, t in bucket)
