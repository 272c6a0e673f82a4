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
    progress: bool = False,
) -> int:
    """Copy the HF checkpoint in ``folder`` into this rank's model chunks.

    Args:
        chunks: this rank's model chunks (one per virtual pipeline stage).
        hf: the HF config the model was built from.
        folder: HF folder with ``model.safetensors`` or a sharded index.
        tp_rank: this rank's tensor-parallel rank.
        tp_size: the tensor-parallel size.
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
    named = [
        (global_name, param)
        for chunk in chunks
        for (local_name, param), global_name in zip(
            chunk.named_parameters(), global_param_names(chunk).values()
        )
    ]
    for name, param in tqdm(named, desc="load HF", disable=not progress, unit="tensor"):
        local = local_tensor(reader, name, param, hf, tp_rank, tp_size)
        with torch.no_grad():
            param.copy_(local)
    return len(named)
