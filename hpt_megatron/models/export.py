"""Weight export: HF-named full tensors from a TP/PP-sharded Megatron model, in bounded buckets.

Who receives what:

- Each parameter is gathered over its tensor-parallel group onto **TP rank 0**, one parameter at
  a time, so no rank ever holds more than one full parameter plus one bucket.
- **Each pipeline stage yields its own parameters** (its TP rank 0 does); stages do not wait for
  each other. A consumer that needs everything in one place (the converter) lets every stage
  write its own shards and merges the index; the rollout weight sync lets every stage push its
  buckets to the engines.
- Data-parallel replicas each produce the same buckets; callers normally export from
  ``dp_rank == 0`` only (all TP ranks of that replica must iterate, they take part in gathers).
- TP ranks other than 0 iterate the generator to the end and receive no buckets.

- **Experts** (mixture-of-experts models) are split over expert-parallel ranks, which are
  data-parallel ranks of the dense layout: each expert-parallel rank exports *its own* experts
  (gathered over the expert TP group onto its rank 0, from expert-data-parallel replica 0), so no
  rank holds the experts of another. :func:`export_roles` says which parameters a rank exports.

Tied embeddings are exported once, as ``model.embed_tokens.weight``; vocabulary padding is
stripped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hpt_megatron.models.mapping import Dims, global_param_names, rule_for

if TYPE_CHECKING:
    from hpt_megatron.models.hf_config import HFModelConfig
    from hpt_megatron.parallel.runtime import ParallelContext

DEFAULT_BUCKET_BYTES = 512 * 1024**2
Bucket = list[tuple[str, torch.Tensor]]


def _gather_tp(local: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor] | None:
    """Every TP rank's shard on TP rank 0 (``None`` elsewhere)."""
    if group is None or dist.get_world_size(group) == 1:
        return [local]
    local = local.detach().contiguous()
    is_dst = dist.get_rank(group) == 0
    shards = (
        [torch.empty_like(local) for _ in range(dist.get_world_size(group))] if is_dst else None
    )
    dist.gather(local, shards, group=group, group_dst=0)
    return shards


def export_roles(ctx: ParallelContext) -> tuple[bool, bool]:
    """``(dense, experts)``: whether this rank takes part in exporting the non-expert
    parameters (data-parallel replica 0) and the expert parameters (expert-data-parallel
    replica 0). Every rank of a TP (expert TP) group gets the same answer."""
    return ctx.dp_rank == 0, ctx.expert_dp_rank == 0


def iter_hf_tensors(
    chunks: Sequence[torch.nn.Module],
    hf: HFModelConfig,
    *,
    tp_group: dist.ProcessGroup | None = None,
    etp_group: dist.ProcessGroup | None = None,
    dtype: torch.dtype | None = None,
    dense: bool = True,
    experts: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full_tensor)`` for this stage's parameters, on TP rank 0 (expert parameters:
    on expert TP rank 0, over ``etp_group``); ``dense`` / ``experts`` choose which (see
    :func:`export_roles`)."""
    dims = Dims.from_hf(hf)
    for chunk in chunks:
        names = global_param_names(chunk)
        for local_name, param in chunk.named_parameters():
            rule = rule_for(names[local_name], hf)
            if not rule.exported or not (experts if rule.expert else dense):
                continue
            shards = _gather_tp(param.detach(), etp_group if rule.expert else tp_group)
            if shards is None:
                continue
            for name, tensor in zip(rule.hf_names, rule.layout.to_hf(shards, dims)):
                yield name, tensor if dtype is None else tensor.to(dtype)


def export_hf_weights(
    chunks: Sequence[torch.nn.Module],
    hf: HFModelConfig,
    *,
    tp_group: dist.ProcessGroup | None = None,
    etp_group: dist.ProcessGroup | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    dense: bool = True,
    experts: bool = True,
) -> Iterator[Bucket]:
    """Buckets of ``(hf_name, full_tensor)`` of at most ``bucket_bytes`` (a larger tensor goes
    alone in its bucket).

    Args:
        chunks: this rank's model chunks (one per virtual pipeline stage).
        hf: the HF config the model was built from.
        tp_group: the tensor-parallel group (``None`` for TP=1).
        etp_group: the expert tensor-parallel group (``None`` for ETP=1).
        bucket_bytes: the bucket size bound, 512 MiB by default.
        dtype: cast exported tensors to this dtype (e.g. bf16 for the rollout servers).
        dense / experts: export the non-expert / the expert parameters (:func:`export_roles`).

    Yields:
        On TP rank 0 of each pipeline stage: that stage's tensors, in parameter order. Every rank
        of the TP group must exhaust the generator.
    """
    tensors = iter_hf_tensors(
        chunks,
        hf,
        tp_group=tp_group,
        etp_group=etp_group,
        dtype=dtype,
        dense=dense,
        experts=experts,
    )
    return bucketed(tensors, bucket_bytes)


def bucketed(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group ``(name, tensor)`` pairs, in order, into buckets of at most ``bucket_bytes`` (a larger
    tensor goes alone in its bucket)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes: must be > 0, got {bucket_bytes}")
    bucket: Bucket = []
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def rank_export_buckets(
    chunks: Sequence[torch.nn.Module], hf: HFModelConfig, ctx: ParallelContext, bucket_bytes: int
) -> Iterator[Bucket]:
    """Collective over TP (and expert TP): this rank's share of the HF export, as buckets.

    Empty unless the rank exports (``export_roles``): TP rank 0 of replica 0 for the dense
    weights, expert TP rank 0 of expert replica 0 for its own experts.
    """
    dense, experts = export_roles(ctx)
    if not (dense or experts):
        return iter(())
    return export_hf_weights(
        chunks,
        hf,
        tp_group=ctx.tp_group if ctx.tp > 1 else None,
        etp_group=ctx.etp_group if ctx.etp > 1 else None,
        bucket_bytes=bucket_bytes,
        dense=dense,
        experts=experts,
    )


def write_rank_shards(
    chunks: Sequence[torch.nn.Module],
    hf: HFModelConfig,
    out: str | Path,
    ctx: ParallelContext,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    progress: bool = False,
) -> tuple[dict[str, str], int] | None:
    """Collective over TP (and expert TP): this rank's share of the export written straight into
    ``out`` as safetensors shards, one bucket at a time (no rank holds more than one bucket).

    TP rank 0 of replica 0 of each pipeline stage writes its own shards (``model-ppK-*`` when
    PP > 1), and with expert parallelism each expert-parallel rank writes its own experts
    (``model-ppK-rankR-*``). Returns ``(weight_map, total_bytes)`` of what this rank wrote, or
    ``None`` on a rank that writes nothing; :func:`merge_shard_index` joins them.
    """
    from tqdm import tqdm

    from hpt_megatron.models.hf_io import HFCheckpointWriter

    dense, experts = export_roles(ctx)
    writes = (dense and ctx.tp_rank == 0) or (experts and ctx.etp_rank == 0)
    writer = None
    if writes:
        prefix = "model" if ctx.pp == 1 else f"model-pp{ctx.pp_rank}"
        if ctx.ep > 1:  # several writers per stage: one per expert-parallel rank
            prefix = f"model-pp{ctx.pp_rank}-rank{ctx.rank}"
        writer = HFCheckpointWriter(out, prefix=prefix)
    buckets = rank_export_buckets(chunks, hf, ctx, bucket_bytes)
    for bucket in tqdm(buckets, desc="export", unit="shard", disable=not progress):
        if writer is not None:
            writer.write(bucket)
    return (writer.weight_map, writer.total_bytes) if writer is not None else None


def merge_shard_index(
    out: str | Path, ctx: ParallelContext, mine: tuple[dict[str, str], int] | None
) -> int:
    """Collective over all ranks (a barrier: every rank's shards are written when it returns):
    the driver writes ``model.safetensors.index.json`` from every rank's ``(weight_map, bytes)``
    (small metadata, gathered as objects). Returns the tensor bytes of the folder (every rank)."""
    from hpt_megatron.models.hf_io import write_index

    parts: list[Any] = [mine]
    if ctx.world_size > 1:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, mine, group=ctx.cpu_group)
    if ctx.is_driver:
        if all(p is None for p in parts):
            raise ValueError(f"{out}: no rank exported any tensor")
        write_index(out, (p for p in parts if p is not None))
    return sum(p[1] for p in parts if p is not None)


def save_hf_folder(
    chunks: Sequence[torch.nn.Module],
    hf: HFModelConfig,
    out: str | Path,
    ctx: ParallelContext,
    *,
    torch_dtype: str,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    progress: bool = False,
) -> None:
    """Collective: write the model as an HF folder (safetensors shards + index + config.json).

    Streams bucket by bucket: every exporting rank writes its own shards
    (:func:`write_rank_shards`); the driver merges the index and writes config.json. Tokenizer
    files are the caller's.

    Args:
        chunks: this rank's (unwrapped) model chunks.
        torch_dtype: the ``torch_dtype`` recorded in config.json (``"float32"``, ``"bfloat16"``).
    """
    from hpt_megatron.models.hf_io import write_config

    mine = write_rank_shards(chunks, hf, out, ctx, bucket_bytes=bucket_bytes, progress=progress)
    merge_shard_index(out, ctx, mine)
    if ctx.is_driver:
        write_config(hf, out, torch_dtype=torch_dtype)
