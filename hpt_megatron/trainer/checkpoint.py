"""The run's checkpoints: Megatron distributed checkpoints (torch_dist) of the model and
optimizer, saved atomically, and :class:`Checkpointer`, the one place that decides when to save,
what to keep, and where a run resumes from.

A checkpoint directory ``step_000123/`` holds the dist-checkpointing shards of the model (and
optionally the optimizer) plus ``hpt_state.json`` (step, data position, RNG, scheduler state) and
a ``COMPLETE`` marker written last. A directory is written as ``step_000123.tmp`` and renamed when
complete, so a crash while saving leaves the previous checkpoint as the newest loadable one.
Because dist-checkpointing stores global tensor keys, a checkpoint loads at any TP/PP layout.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from hpt_megatron.parallel.runtime import ParallelContext, broadcast_from_driver

if TYPE_CHECKING:
    from hpt_megatron.trainer.engine import TrainEngine

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
BEST = "best"
COMPLETE = "COMPLETE"
STATE_FILE = "hpt_state.json"
MANIFEST = "manifest.json"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The converter's key layout (TE norm names), so converted checkpoints load here too."""
    from hpt_megatron.models.checkpoint import model_sharded_state_dict as sharded

    return sharded([_unwrap(c) for c in chunks])


def _flat(model_sd: dict[str, Any]) -> dict[str, Any]:
    """The optimizer maps its state onto the model's tensors through one flat dict."""
    flat: dict[str, Any] = {}
    for chunk_sd in model_sd.values():
        flat.update(chunk_sd)
    return flat


def save_checkpoint(
    path: str | Path,
    chunks: list[torch.nn.Module],
    optimizer: Any | None = None,
    state: dict[str, Any] | None = None,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Collective: every rank calls it. Writes ``path`` atomically; returns it."""
    from megatron.core import dist_checkpointing

    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(group)
    model_sd = model_sharded_state_dict(chunks)
    sharded: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(_flat(model_sd))
    dist_checkpointing.save(sharded, str(tmp))
    _barrier(group)
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(state or {}, indent=1))
        write_manifest(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    _barrier(group)
    return final


def load_checkpoint(
    path: str | Path,
    chunks: list[torch.nn.Module],
    optimizer: Any | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Collective: load model (and optimizer) shards for this rank's layout; return the state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / COMPLETE).is_file() and not (path / "metadata.json").is_file():
        raise ValueError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    model_sd = model_sharded_state_dict(chunks)
    sharded: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(_flat(model_sd), is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path), strict="assume_ok_unexpected")
    for key, chunk in zip(model_sd, chunks):
        _unwrap(chunk).load_state_dict(loaded["model"][key], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    state_file = path / STATE_FILE
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def write_manifest(path: Path) -> None:
    """Size and CRC32 of every file, so a damaged checkpoint is detected before loading."""
    entries = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        entries[str(file.relative_to(path))] = [file.stat().st_size, _crc(file)]
    (path / MANIFEST).write_text(json.dumps(entries))


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is intact, else why not."""
    if not (path / COMPLETE).is_file():
        return "no COMPLETE marker"
    try:
        entries = json.loads((path / MANIFEST).read_text())
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"unreadable manifest or state: {err}"
    for name, (size, crc) in entries.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if file.stat().st_size != size or _crc(file) != crc:
            return f"file {name} is damaged (size or checksum differs)"
    return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted((p for p in found if (p / COMPLETE).is_file()), key=lambda p: p.name)


def prune_checkpoints(root: str | Path, keep_last: int, protect: set[str] | None = None) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and stale ``.tmp`` dirs)."""
    root = Path(root)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    ckpts = list_checkpoints(root)
    for old in ckpts[: max(0, len(ckpts) - keep_last)]:
        if protect and old.name in protect:
            continue
        shutil.rmtree(old, ignore_errors=True)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def _barrier(group: dist.ProcessGroup | None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc(file: Path) -> int:
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


def choose_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``never``, a path, or ``auto`` (newest intact one)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        problem = verify_checkpoint(path)
        if problem:
            raise ValueError(f"run.resume: {path} cannot be resumed from: {problem}")
        return path
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is unusable (%s); falling back to an older one", path, problem)
    return None


class Checkpointer:
    """Saves ``<root>/step_N`` every ``save_every`` steps, at the last step and on a new best
    validation score (also as ``<root>/best``, weights only), keeps the newest ``keep_last``, and
    resumes from ``resume`` (``auto``: the newest intact checkpoint, falling back to older ones).

    Every rank holds one and calls its methods together (they are collective). The saved state
    holds the step, the best score, the RNG, the LR schedule and ``extra`` (the driver's data
    position). ``describe`` (driver only) adds files that make a folder self-contained, such as
    the HF config and tokenizer.
    """

    def __init__(
        self,
        root: Path,
        ctx: ParallelContext,
        *,
        save_every: int,
        keep_last: int,
        last_step: int,
        describe: Callable[[Path], None] | None = None,
    ) -> None:
        self.root = root
        self.ctx = ctx
        self.save_every = save_every
        self.keep_last = keep_last
        self.last_step = last_step
        self.describe = describe
        self.best_val = float("-inf")

    def resume(self, resume: str, engine: TrainEngine) -> dict[str, Any] | None:
        """Load the checkpoint chosen on the driver into ``engine``; its state, or None."""
        path = choose_resume(self.root, resume) if self.ctx.is_driver else None
        path = broadcast_from_driver(self.ctx, path)
        if path is None:
            return None
        state = load_checkpoint(path, engine.model_chunks, engine.optimizer)
        engine.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state.get("rng", {}))
        self.best_val = float(state.get("best_val", float("-inf")))
        log.info("resumed from %s at step %d", path, state["step"])
        return state

    def will_save(self, step: int, val: float | None) -> bool:
        """Whether :meth:`maybe_save` saves ``step`` (so companions can save first)."""
        due = bool(self.save_every) and step % self.save_every == 0
        return due or step == self.last_step or (val is not None and val > self.best_val)

    def maybe_save(
        self, step: int, engine: TrainEngine, val: float | None, extra: dict[str, Any]
    ) -> bool:
        """Save after ``step`` when it is due or ``val`` is a new best; returns whether it saved.

        ``val`` must be the same on every rank (they all decide whether to save).
        """
        is_best = val is not None and val > self.best_val
        if is_best:
            self.best_val = float(val)  # type: ignore[arg-type]
        due = bool(self.save_every) and step % self.save_every == 0
        if not (due or step == self.last_step or is_best):
            return False
        state = {
            "step": step,
            "best_val": self.best_val,
            "rng": rng_state(),
            "scheduler": engine.scheduler.state_dict(),
            **extra,
        }
        group = self.ctx.cpu_group
        paths = [
            save_checkpoint(
                step_dir(self.root, step), engine.model_chunks, engine.optimizer, state, group=group
            )
        ]
        if is_best:
            paths.append(
                save_checkpoint(self.root / BEST, engine.model_chunks, None, state, group=group)
            )
        if self.ctx.is_driver:
            for path in paths:
                if self.describe is not None:
                    self.describe(path)
            prune_checkpoints(self.root, self.keep_last)
        return True
