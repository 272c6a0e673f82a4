"""Megatron distributed checkpoints (``dist_checkpointing``, torch_dist format) of model weights.

A checkpoint holds every tensor once with its global shape, so it loads at any TP/PP layout.
Keys use Transformer Engine's names for the fused norms (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``) whichever layers wrote it, so a checkpoint written on CPU with
local layers loads on GPU with TE layers and back. The vocabulary rows are saved with Megatron's
``allow_shape_mismatch``: a layout with a different padded vocabulary loads the common rows.
The one loader of such checkpoints is ``trainer.checkpoint_files.load_checkpoint``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Local-spec name -> TE-spec name, for checkpoint keys.
_TE_KEYS = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}
META_FILE = "hpt_model.json"


def _te_key(key: str) -> str:
    for local, te in _TE_KEYS.items():
        if key.endswith(local) and ".layers." in key:
            return key[: -len(local)] + te
    return key


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """``{"model": ...}`` (or ``model0``, ``model1``, ... per virtual stage) of sharded tensors."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out: dict[str, Any] = {}
    for i, chunk in enumerate(chunks):
        sharded = chunk.sharded_state_dict()  # type: ignore[operator]
        for value in sharded.values():
            if isinstance(value, ShardedTensor):
                value.key = _te_key(value.key)
        out["model" if len(chunks) == 1 else f"model{i}"] = sharded
    return out


def save_model_checkpoint(
    chunks: Sequence[torch.nn.Module], folder: str | Path, meta: dict[str, Any] | None = None
) -> None:
    """Write this rank's chunks into a torch_dist checkpoint (collective over all ranks).

    ``folder`` must be empty or absent. ``meta`` (e.g. the HF config) goes to ``hpt_model.json``.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    folder = Path(folder)
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(folder))
    if dist.get_rank() == 0 and meta is not None:
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    dist.barrier()
