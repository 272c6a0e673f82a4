"""Load HF safetensors into a (TP/PP-sharded) Megatron model, streaming one tensor at a time.

Every rank reads only the HF tensors its own parameters need and keeps one parameter's worth of
HF data alive at a time; the model itself is the only full-size allocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hpt_megatron.models.hf_io import HFCheckpointReader
from hpt_megatron.models.mapping import Dims, global_param_names, rule_for

if TYPE_CHECKING:
    from hpt_megatron.models.hf_config import HFModelConfig


def _describe(dims: Dims) -> str:
    return f"heads={dims.heads}, kv_heads={dims.groups}, head_dim={dims.head_dim}"


def check_expert_tensors(reader: HFCheckpointReader, hf: HFModelConfig) -> None:
    """Raise ``ValueError`` naming the layer and tensor when the checkpoint's experts are not the
    config's (a layer with more or fewer experts, experts on a dense layer)."""
    stored = reader.expert_counts()
    expected = [hf.num_experts if sparse else 0 for sparse in hf.moe_layers]
    for layer, count in sorted(stored.items()):
        want = expected[layer] if layer < len(expected) else 0
        if count != want:
            raise ValueError(
                f"{reader.folder}: model.layers.{layer}.mlp.experts holds {count} experts, "
                f"config.json has {want} for that layer (num_experts={hf.num_experts}, "
                f"mlp_only_layers={list(hf.mlp_only_layers)})"
            )
    for layer, want in enumerate(expected):
        if want and layer not in stored:
            raise ValueError(
                f"{reader.folder}: model.layers.{layer}.mlp.experts: no expert tensors, "
                f"config.json has num_experts={want} there"
            )


def local_tensor(
    reader: HFCheckpointReader,
    name: str,
    param: torch.Tensor,
    hf: HFModelConfig,
    tp_rank: int,
    tp_size: int,
) -> torch.Tensor:
    rule = rule_for(name, hf)
    dims = Dims.from_hf(hf)
    hf_tensors = [reader.get(n) for n in rule.hf_names]
    try:
        local = rule.layout.to_local(hf_tensors, tp_rank, tp_size, param.shape, dims)
    except RuntimeError as err:
        shapes = {n: list(t.shape) for n, t in zip(rule.hf_names, hf_tensors)}
        raise ValueError(
            f"{reader.folder}: {shapes} do not match config.json ({_describe(dims)}): {err}"
        ) from err
    if local.shape != param.shape:
        shapes = {n: list(t.shape) for n, t in zip(rule.hf_names, hf_tensors)}
        raise ValueError(
            f"{reader.folder}: {shapes} give a {list(local.shape)} shard of {name}, but the model "
            f"built from config.json ({_describe(dims)}) has {list(param.shape)}"
        )
    return local


def load_hf_weights(
    chunks: Sequence[torch.nn.Module],
    hf: HFModelConfig,
    folder: str | Path,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    etp_rank: int = 0,
    etp_size: int = 1,
    progress: bool = False,
) -> int:
    """Copy the HF checkpoint in ``folder`` into this rank's model chunks.

    Args:
        chunks: this rank's model chunks (one per virtual pipeline stage).
        hf: the HF config the model was built from.
        folder: HF folder with ``model.safetensors`` or a sharded index.
        tp_rank: this rank's tensor-parallel rank.
        tp_size: the tensor-parallel size.
        etp_rank / etp_size: the expert tensor-parallel rank and size (experts; each rank's
            own experts are found from the model's expert-parallel group).
        progress: show a progress bar.

    Returns:
        The number of parameters loaded.

    Raises:
        ValueError: a missing shard or tensor, or a shape that does not match the config.
    """
    from tqdm import tqdm

    # tqdm's monitor thread breaks the forked writer processes of dist_checkpointing.save.
    tqdm.monitor_interval = 0
    reader = HFCheckpointReader(folder)
    check_expert_tensors(reader, hf)
    named = [
        (global_name, param)
        for chunk in chunks
        for (local_name, param), global_name in zip(
            chunk.named_parameters(), global_param_names(chunk).values()
        )
    ]
    for name, param in tqdm(named, desc="load HF", disable=not progress, unit="tensor"):
        expert = rule_for(name, hf).expert
        rank, size = (etp_rank, etp_size) if expert else (tp_rank, tp_size)
        local = local_tensor(reader, name, param, hf, rank, size)
        with torch.no_grad():
            param.copy_(local)
    return len(named)
