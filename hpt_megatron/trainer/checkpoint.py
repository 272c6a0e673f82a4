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
import queue
import random
import re
import shutil
import threading
import time
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
_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
_MANIFEST = re.compile(r"^\.?manifest(_\d+)?\.json(\.tmp)?$")
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
    """The optimizer maps its state onto the model's tensors through one flat dict. Keys are
    prefixed by the chunk: virtual stages' state dicts share local names (``decoder.layers.0``)."""
    return {f"{chunk}.{key}": value for chunk, sd in model_sd.items() for key, value in sd.items()}


def _space_note(path: Path) -> str:
    """What the filesystem of ``path`` has left, the likely cause of a failed write (torch's zip
    writer reports a full disk as an ``unexpected pos`` error, not as ENOSPC)."""
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        return ""
    if free < 16 * 1024**2:
        return f"; the disk is full (no space left on device: {free} bytes free)"
    return f"; {free / 1024**2:.0f} MiB free on that disk"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message says where and why."""


class SnapshotBuffers:
    """Host memory for the snapshot of a background save, kept from one save to the next (as
    ``torch.distributed.checkpoint``'s stager keeps its staged state dict): the first save
    allocates a copy of this rank's share of the state; later ones copy into it, which is about
    as fast as the memory bandwidth, where allocating and first touching gigabytes is not.

    One save at a time uses it (:class:`Checkpointer` waits for a save before the next)."""

    def __init__(self) -> None:
        self._free: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self._used: list[tuple[tuple[Any, ...], torch.Tensor]] = []

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` in a free buffer of its shape (a new buffer if there is none)."""
        key = (tuple(tensor.shape), tensor.dtype, tensor.device)
        free = self._free.setdefault(key, [])
        buffer = free.pop() if free else torch.empty_like(tensor)
        buffer.copy_(tensor)
        self._used.append((key, buffer))
        return buffer

    def release(self) -> None:
        """The save that used the buffers is written: they are free for the next one."""
        for key, buffer in self._used:
            self._free[key].append(buffer)
        self._used = []


class PendingSave:
    """A checkpoint whose shards are being written (in a thread, or already written inline).

    :meth:`finish` is collective: it waits for every rank's writes, runs Megatron's finalisation
    (the global ``.metadata``), has every rank checksum the files it wrote into
    ``manifest_<rank>.json`` (in parallel), and only then writes ``COMPLETE`` and renames the
    ``.tmp`` directory into place.
    """

    def __init__(
        self,
        tmp: Path,
        final: Path,
        request: Any,
        state: dict[str, Any] | None,
        group: dist.ProcessGroup | None,
        buffers: SnapshotBuffers | None = None,
    ) -> None:
        self.tmp, self.final, self.request, self.state, self.group = (
            tmp,
            final,
            request,
            state,
            group,
        )
        self.buffers = buffers
        self.error: str | None = None
        self.thread: threading.Thread | None = None
        self.checksums: dict[str, list[int]] = {}  # of the files written, computed by the writer
        # Set once the tensors written are copied: the weights may change from then on.
        self.staged = threading.Event()

    def start(self, background: bool) -> PendingSave:
        """Write this rank's shards: inline, or in a thread with ``background``. A background
        save of host tensors also takes its snapshot in that thread (while the next step's
        forward and backward run; the update waits for :attr:`staged`); device tensors are
        copied to host here, before returning."""
        if background and self._host_only():
            self.thread = threading.Thread(target=self._stage_and_write, daemon=True)
            self.thread.start()
            return self
        try:
            write = self._snapshot_writes(copy=background)
        finally:
            self.staged.set()
        if write is None:
            return self
        if background:
            self.thread = threading.Thread(target=self._write, args=(write,), daemon=True)
            self.thread.start()
        else:
            self._write(write)
        return self

    def _host_only(self) -> bool:
        req = self.request
        if req is None or req.async_fn is None:
            return False
        _, originals, _ = req.async_fn_args
        return all(t.device.type == "cpu" for _, _, (_, tensors) in originals for _, t in tensors)

    def _stage_and_write(self) -> None:
        try:
            write = self._snapshot_writes(copy=True)
        except Exception as err:  # reported collectively by finish()
            self.error = f"{type(err).__name__}: {err}"
            return
        finally:
            self.staged.set()
        self._write(write)

    def _snapshot_writes(self, copy: bool) -> Any:
        """Stage the tensors this rank writes: device tensors are copied to host by Megatron's
        preload; with ``copy``, host tensors that are live training state are cloned, so that
        training may go on while they are written (into ``buffers`` when there are some)."""
        req = self.request
        if req is None or req.async_fn is None:
            return None
        transform_list, use_msc = req.async_fn.args[:2]
        _, originals, results_queue = req.async_fn_args
        staged = req.preload_fn() if req.preload_fn is not None else originals
        live = {t.data_ptr() for _, _, (_, tensors) in originals for _, t in tensors}
        buckets = []
        clone = self.buffers.copy if self.buffers is not None else torch.Tensor.clone
        for file_name, key, (bytes_data, tensors) in staged:
            copied = [(i, clone(t) if copy and t.data_ptr() in live else t) for i, t in tensors]
            buckets.append((file_name, key, (bytes_data, copied)))
        return transform_list, use_msc, buckets, results_queue

    def _write(self, write: Any) -> None:
        """This rank's shard files, one thread per file (Megatron's own writer forks processes;
        threads leave no helper behind and cannot hang in fork)."""
        from concurrent.futures import ThreadPoolExecutor

        transform_list, use_msc, buckets, results_queue = write
        try:
            with ThreadPoolExecutor(len(buckets)) as pool:
                done = list(
                    pool.map(
                        lambda ib: self._write_bucket(transform_list, use_msc, *ib),
                        enumerate(buckets),
                    )
                )
        except Exception as err:  # reported collectively by finish()
            self.error = f"{type(err).__name__}: {err}{_space_note(self.tmp)}"
            return
        for name, entry, _ in done:
            self.checksums[name] = entry
        results_queue.put({idx: result for idx, (_, _, result) in enumerate(done)})

    def _write_bucket(
        self, transform_list: Any, use_msc: bool, idx: int, bucket: Any
    ) -> tuple[str, list[int], Any]:
        """Write one file; its name, [size, CRC32] and Megatron's write results."""
        from megatron.core.dist_checkpointing.strategies.filesystem_async import (
            FileSystemWriterAsync,
        )

        out: queue.Queue = queue.Queue()
        count: queue.Queue = queue.Queue()
        count.put(idx)
        FileSystemWriterAsync.write_preloaded_data(
            transform_list, idx, bucket, out, count, True, use_msc=use_msc
        )
        _, result = out.get()
        if isinstance(result, Exception):
            raise result
        file = Path(bucket[0])
        return str(file.relative_to(self.tmp)), [file.stat().st_size, _crc(file)], result

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def finish(self) -> Path:
        """Collective: wait for the writes, finalise, write the manifests and ``COMPLETE``."""
        if self.thread is not None:
            self.thread.join()
        if self.buffers is not None:
            self.buffers.release()
        rank = dist.get_rank() if dist.is_initialized() else 0
        errors = _gather((rank, self.error), self.group)
        failed = [(r, e) for r, e in errors if e]
        if failed:
            if rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            where = "; ".join(f"rank {r}: {e}" for r, e in failed)
            raise CheckpointError(
                f"checkpoint {self.final.name} could not be written to {self.tmp} ({where}); "
                "its partial files were removed; the newest loadable checkpoint is unchanged"
            )
        if self.request is not None:
            for fn in self.request.finalize_fns:  # Megatron's: global metadata, collective
                fn()
        _barrier(self.group)
        if rank == 0:
            (self.tmp / STATE_FILE).write_text(json.dumps(self.state or {}, indent=1))
        write_rank_manifest(self.tmp, rank, known=self.checksums)  # every rank, its own files
        _barrier(self.group)
        if rank == 0:
            write_rank_manifest(self.tmp, 0, rest=True)  # files nobody else claimed
            (self.tmp / COMPLETE).write_text("ok\n")
            _fsync_dir(self.tmp)
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
            _fsync_dir(self.final.parent)
        _barrier(self.group)
        return self.final


def begin_save(
    path: str | Path,
    chunks: list[torch.nn.Module],
    optimizer: Any | None = None,
    state: dict[str, Any] | None = None,
    group: dist.ProcessGroup | None = None,
    background: bool = False,
    buffers: SnapshotBuffers | None = None,
) -> PendingSave:
    """Collective: plan the checkpoint ``path`` and start writing this rank's shards (in a
    thread with ``background``, its snapshot in ``buffers`` when given);
    :meth:`PendingSave.finish` completes it.

    The writing is spread over the ranks of ``group`` (Megatron's fully parallel save): a
    tensor held by several ranks (data-parallel replicas, tensor-parallel copies of the norms)
    is written by one of them, chosen so that every rank writes about the same number of bytes,
    instead of always by its first replica (data-parallel rank 0 would write everything)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

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
    strategy: Any = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=2)  # 2 files a rank
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    try:
        request = dist_checkpointing.save(
            sharded, str(tmp), sharded_strategy=strategy, async_sharded_save=True
        )
    except OSError as err:  # the common part (rank 0) failed, e.g. a full disk
        raise CheckpointError(
            f"checkpoint {final.name} could not be written to {tmp}: {err}"
        ) from err
    return PendingSave(tmp, final, request, state, group, buffers).start(background)


def save_checkpoint(
    path: str | Path,
    chunks: list[torch.nn.Module],
    optimizer: Any | None = None,
    state: dict[str, Any] | None = None,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Collective: every rank calls it. Writes ``path`` atomically; returns it."""
    return begin_save(path, chunks, optimizer, state, group).finish()


def _gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
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
        entries[name] = known.get(name) or [file.stat().st_size, _crc(file)]
    tmp = path / f".manifest_{rank}.json.tmp"
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path / f"manifest_{rank}.json")


def write_manifest(path: Path) -> None:
    """One manifest of every file, by one process (checkpoints written without ranks)."""
    write_rank_manifest(path, 0, rest=True)


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
    """The checkpoint to resume from: ``never``, a path, or ``auto`` (newest intact one), checked
    by this process alone (:meth:`Checkpointer.resume` shares the reading among the ranks)."""
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
    position), all taken when the save starts, with the weights. ``describe`` (driver only) adds
    files that make a folder self-contained, such as the HF config and tokenizer.

    With ``background`` the shards of a periodic save are written in a thread while training
    goes on; :meth:`poll` (every step) completes a save whose writes have finished on every rank,
    and the next save, a best-score save and :meth:`close` wait for it.
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
        background: bool = False,
    ) -> None:
        self.root = root
        self.ctx = ctx
        self.save_every = save_every
        self.keep_last = keep_last
        self.last_step = last_step
        self.describe = describe
        self.background = background
        self.best_val = float("-inf")
        self.pending: PendingSave | None = None
        self.buffers = SnapshotBuffers()  # the background saves' snapshot, kept between saves
        self.staging_wait_s = 0.0  # time updates waited for a snapshot, since last taken
        self.last_complete: Path | None = None  # the newest checkpoint known complete

    def _verify(self, path: Path) -> str | None:
        """Collective: every rank reads back its share of the manifests."""
        ctx = self.ctx
        path = broadcast_from_driver(ctx, path)
        problem = verify_checkpoint(path, ctx.rank, ctx.world_size)
        problems = _gather(problem, self.ctx.cpu_group)
        return next((p for p in problems if p), None)

    def resume(self, resume: str, engine: TrainEngine) -> dict[str, Any] | None:
        """Load the checkpoint chosen (and verified by all ranks) into ``engine``; its state."""
        if resume == "never":
            return None
        path: Path | None = None
        if resume != "auto":
            problem = self._verify(Path(resume))
            if problem:
                raise ValueError(f"run.resume: {resume} cannot be resumed from: {problem}")
            path = Path(resume)
        else:  # the driver's listing, newest first, each verified by all ranks together
            found = list_checkpoints(self.root) if self.ctx.is_driver else []
            for candidate in reversed(broadcast_from_driver(self.ctx, found)):
                problem = self._verify(candidate)
                if problem is None:
                    path = candidate
                    break
                if self.ctx.is_driver:
                    log.warning(
                        "checkpoint %s is unusable (%s); falling back to an older one",
                        candidate,
                        problem,
                    )
        if path is None:
            return None
        state = load_checkpoint(path, engine.model_chunks, engine.optimizer)
        engine.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state.get("rng", {}))
        self.best_val = float(state.get("best_val", float("-inf")))
        self.last_complete = Path(path)
        log.info("resumed from %s at step %d", path, state["step"])
        return state

    def due(self, step: int, val: float | None) -> bool:
        """Whether :meth:`maybe_save` would save after ``step``."""
        is_best = val is not None and val > self.best_val
        due = bool(self.save_every) and step % self.save_every == 0
        return due or step == self.last_step or is_best

    def maybe_save(
        self,
        step: int,
        engine: TrainEngine,
        val: float | None,
        extra: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """Save after ``step`` when it is due, ``val`` is a new best or ``force``; returns
        whether it saved (or started saving).

        ``val`` must be the same on every rank (they all decide whether to save).
        """
        is_best = val is not None and val > self.best_val
        if not (force or self.due(step, val)):
            return False
        if is_best:
            self.best_val = float(val)  # type: ignore[arg-type]
        self.wait()  # one save at a time
        state = {
            "step": step,
            "best_val": self.best_val,
            "rng": rng_state(),
            "scheduler": engine.scheduler.state_dict(),
            **extra,
        }
        group = self.ctx.cpu_group
        background = self.background and not is_best and not force and step != self.last_step
        self.pending = begin_save(
            step_dir(self.root, step),
            engine.model_chunks,
            engine.optimizer,
            state,
            group=group,
            background=background,
            buffers=self.buffers if background else None,
        )
        if not background:
            self.wait()
        else:
            engine.before_update = self.wait_staged
        if is_best:
            best = save_checkpoint(self.root / BEST, engine.model_chunks, None, state, group=group)
            if self.ctx.is_driver and self.describe is not None:
                self.describe(best)
        return True

    def wait_staged(self) -> None:
        """Block until the pending save's snapshot is taken (the engine calls it before each
        update: the weights and optimizer state must not change while they are copied)."""
        if self.pending is not None and not self.pending.staged.is_set():
            t0 = time.perf_counter()
            self.pending.staged.wait()
            self.staging_wait_s += time.perf_counter() - t0

    def take_staging_wait(self) -> float:
        """The time updates waited for snapshots since the last call."""
        waited, self.staging_wait_s = self.staging_wait_s, 0.0
        return waited

    def poll(self) -> None:
        """Collective, cheap: complete the pending save if every rank has written its shards."""
        if self.pending is None:
            return
        flag = torch.tensor([0 if self.pending.done() else 1], dtype=torch.int32)
        if dist.is_initialized() and self.ctx.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.cpu_group)
        if not flag.item():
            self.wait()

    def wait(self) -> None:
        """Collective: complete the pending save (waiting for its writes)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            path = pending.finish()
        except CheckpointError as err:
            newest = self.last_complete or "none (no checkpoint has completed yet)"
            raise CheckpointError(f"{err}: {newest}. Free space and resume") from None
        self.last_complete = path
        if self.ctx.is_driver:
            if self.describe is not None:
                self.describe(path)
            prune_checkpoints(self.root, self.keep_last)

    close = wait
