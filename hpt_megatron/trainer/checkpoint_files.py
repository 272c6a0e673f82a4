"""The on-disk layout of a run's checkpoints, and the one loader of Megatron distributed
checkpoints (training checkpoints, converted ones, critics, the reference) used by the trainer,
``hpt score`` and ``hpt convert critic-to-hf``.

A checkpoint directory ``step_000123/`` holds the dist-checkpointing (torch_dist) shards of the
model (and optionally the optimizer) plus ``hpt_state.json`` (step, data position, RNG, scheduler
state), one ``manifest_<rank>.json`` per writing rank (size and CRC32 of each file) and a
``COMPLETE`` marker written last. Because dist-checkpointing stores global tensor keys, a
checkpoint's model loads at any TP/PP/DP layout, and so does the state of the plain optimizer;
the distributed optimizer's sharded state (:data:`OPTIMIZER_METADATA`) resumes at the same TP/PP
and any DP size. Writing lives in ``trainer/checkpoint_write.py``; when to
save, what to keep and where to resume in ``trainer/checkpoint.py``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpt_megatron.models.checkpoint import model_sharded_state_dict

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
_MANIFEST = re.compile(r"^\.?manifest(_\d+)?\.json(\.tmp)?$")
BEST = "best"
COMPLETE = "COMPLETE"
STATE_FILE = "hpt_state.json"
MANIFEST = "manifest.json"
# How the distributed optimizer lays out its sharded state (the plain optimizer ignores it).
# Megatron-core 0.16's own default, ``fully_sharded_model_space``, builds flattened-range shards
# that its checkpointing refuses ("ShardedTensor.flattened_range is not supported");
# ``dp_reshardable`` (Megatron-LM's default) writes each rank's contiguous part of the buffers,
# in parallel and without gathering, and loads at any data-parallel size with the same TP/PP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def sharded_model(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The sharded state dict of (DDP-wrapped or bare) chunks, in the converter's key layout."""
    return model_sharded_state_dict([_unwrap(c) for c in chunks])


def flat_model_state(model_sd: dict[str, Any]) -> dict[str, Any]:
    """The optimizer maps its state onto the model's tensors through one flat dict. Keys are
    prefixed by the chunk: virtual stages' state dicts share local names (``decoder.layers.0``)."""
    return {f"{chunk}.{key}": value for chunk, sd in model_sd.items() for key, value in sd.items()}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message says where and why."""


def gather_objects(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def load_checkpoint(
    path: str | Path,
    chunks: list[torch.nn.Module],
    optimizer: Any | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Collective: load model (and optimizer) shards for this rank's layout; return the state
    (``hpt_state.json``; empty for a checkpoint without one).

    The one loader of Megatron distributed checkpoints: a run's ``step_N`` (with its
    ``COMPLETE`` marker), a critic's, the reference's, and the converter's output (Megatron's
    ``metadata.json`` alone), at any layout; ``hpt score`` and ``hpt convert critic-to-hf`` use
    it too. ``chunks`` may be DDP-wrapped or bare.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    if not (path / COMPLETE).is_file() and not (path / "metadata.json").is_file():
        raise ValueError(
            f"{path}: not a complete checkpoint (no {COMPLETE} marker) nor a Megatron "
            "distributed checkpoint (no metadata.json)"
        )
    model_sd = sharded_model(chunks)
    sharded: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        flat = flat_model_state(model_sd)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            flat, is_loading=True, metadata=OPTIMIZER_METADATA
        )
    try:
        loaded = dist_checkpointing.load(sharded, str(path), strict="assume_ok_unexpected")
    except (KeyError, CheckpointException) as err:  # torch's loader wraps a rank's KeyError
        if "optimizer.distributed." not in str(err):
            raise
        raise ValueError(
            f"{path}: its distributed-optimizer state does not fit this layout: the "
            f"{OPTIMIZER_METADATA['distrib_optim_sharding_type']} format loads only at the "
            "tensor/pipeline-parallel sizes it was saved with (any data-parallel size); resume "
            "with those, or start from its weights alone (model.load)"
        ) from err
    for key, chunk in zip(model_sd, chunks):
        _unwrap(chunk).load_state_dict(loaded["model"][key], strict=strict)
    if optimizer is not None:
        # Without autograd: with fp32 weights the distributed optimizer's main parameters are
        # views of the model's (leaf tensors that require grad), which its dp_reshardable load
        # copies into in place.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    state_file = path / STATE_FILE
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def _owner(name: str) -> int | None:
    """The rank that wrote a shard file (Megatron names them ``__<rank>_<n>.distcp``)."""
    match = _SHARD.match(name)
    return int(match.group(1)) if match else None


def write_rank_manifest(
    path: Path, rank: int, rest: bool = False, known: dict[str, list[int]] | None = None
) -> None:
    """Size and CRC32 of the files ``rank`` wrote, into ``manifest_<rank>.json``; with ``rest``
    (rank 0, after the others) also every file no manifest lists yet. ``known`` holds entries
    the writer already computed (the files are not read again)."""
    files = [p for p in path.rglob("*") if p.is_file() and not _MANIFEST.match(p.name)]
    if rest:
        claimed: set[str] = set()
        for other in path.glob("manifest_*.json"):
            claimed.update(json.loads(other.read_text()))
        mine = [f for f in files if str(f.relative_to(path)) not in claimed]
        target = path / f"manifest_{rank}.json"
        entries = json.loads(target.read_text()) if target.is_file() else {}
    else:
        mine = [f for f in files if _owner(f.name) == rank]
        entries = {}
    known = known or {}
    for file in sorted(mine):
        name = str(file.relative_to(path))
        entries[name] = known.get(name) or [file.stat().st_size, file_crc32(file)]
    tmp = path / f".manifest_{rank}.json.tmp"
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path / f"manifest_{rank}.json")


def manifests(path: Path) -> list[Path]:
    """The manifest files of a checkpoint (per rank; ``manifest.json`` in older checkpoints)."""
    found = sorted(path.glob("manifest_*.json"), key=lambda p: p.name)
    return found or ([path / MANIFEST] if (path / MANIFEST).is_file() else [])


def verify_checkpoint(path: Path, part: int = 0, parts: int = 1) -> str | None:
    """None when ``path`` is intact, else why not. With ``parts`` > 1 only every ``parts``-th
    manifest from ``part`` is read back, so ``parts`` processes verify a checkpoint together."""
    if not (path / COMPLETE).is_file():
        return "no COMPLETE marker"
    listed = manifests(path)
    if not listed:
        return "no manifest"
    try:
        json.loads((path / STATE_FILE).read_text())
        chosen = [json.loads(m.read_text()) for m in listed[part::parts]]
    except (OSError, ValueError) as err:
        return f"unreadable manifest or state: {err}"
    for entries in chosen:
        for name, (size, crc) in entries.items():
            file = path / name
            if not file.is_file():
                return f"missing file {name}"
            if file.stat().st_size != size or file_crc32(file) != crc:
                return f"file {name} is damaged (size or checksum differs)"
    return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted((p for p in found if (p / COMPLETE).is_file()), key=lambda p: p.name)


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and stale ``.tmp`` dirs)."""
    root = Path(root)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    ckpts = list_checkpoints(root)
    for old in ckpts[: max(0, len(ckpts) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def barrier(group: dist.ProcessGroup | None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_crc32(file: Path) -> int:
    crc = 0
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].tolist(),  # type: ignore[index]  # legacy: a tuple
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    # Only the key array is saved; the rest is that of a freshly seeded generator.
    keys = np.array(state["numpy"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, 624, 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
