"""Writing a checkpoint: Megatron's fully parallel torch_dist save, inline or in a background
thread, made atomic (written as ``step_N.tmp``, checksummed into per-rank manifests, ``COMPLETE``
written last, then renamed), so a crash while saving leaves the previous checkpoint as the newest
loadable one (the layout: ``trainer/checkpoint_files.py``).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpt_megatron.disk import NOT_SPACE, space_note
from hpt_megatron.trainer.checkpoint_files import (
    COMPLETE,
    OPTIMIZER_METADATA,
    STATE_FILE,
    CheckpointError,
    barrier,
    file_crc32,
    flat_model_state,
    fsync_dir,
    gather_objects,
    sharded_model,
    write_rank_manifest,
)
from hpt_megatron.trainer.engine import StateHold


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
        # Released once the tensors written are copied: the weights may change from then on.
        self.staged = StateHold()

    def start(self, background: bool) -> PendingSave:
        """Write this rank's shards: inline, or in a thread with ``background``. A background
        save of host tensors also takes its snapshot in that thread (while the next step's
        forward and backward run; the engine's next optimizer step waits for :attr:`staged`);
        device tensors are copied to host here, before returning."""
        if background and self._host_only():
            self.thread = threading.Thread(target=self._stage_and_write, daemon=True)
            self.thread.start()
            return self
        try:
            write = self._snapshot_writes(copy=background)
        finally:
            self.staged.release()
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
            self.staged.release()
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
            self.error = f"{type(err).__name__}: {err}{space_note(self.tmp)}"
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
        return str(file.relative_to(self.tmp)), [file.stat().st_size, file_crc32(file)], result

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def finish(self) -> Path:
        """Collective: wait for the writes, finalise, write the manifests and ``COMPLETE``."""
        if self.thread is not None:
            self.thread.join()
        if self.buffers is not None:
            self.buffers.release()
        rank = dist.get_rank() if dist.is_initialized() else 0
        errors = gather_objects((rank, self.error), self.group)
        failed = [(r, e) for r, e in errors if e]
        if failed:
            if rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            where = "; ".join(f"rank {r}: {e}" for r, e in failed)
            raise CheckpointError(
                f"checkpoint {self.final.name} could not be written to {self.tmp} ({where}); "
                "its partial files were removed; the newest loadable checkpoint is unchanged"
            )
        try:
            self._finalize(rank)
        except OSError as err:  # e.g. the disk filled up under the metadata or a manifest
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint {self.final.name} could not be written to {self.tmp} (rank {rank}: "
                f"{type(err).__name__}: {err}{space_note(self.tmp)}); its partial files were "
                "removed; the newest loadable checkpoint is unchanged"
            ) from None
        return self.final

    def _finalize(self, rank: int) -> None:
        """Collective: Megatron's metadata, the manifests, ``COMPLETE``, the rename."""
        if self.request is not None:
            for fn in self.request.finalize_fns:  # Megatron's: global metadata, collective
                fn()
        barrier(self.group)
        if rank == 0:
            (self.tmp / STATE_FILE).write_text(json.dumps(self.state or {}, indent=1))
        write_rank_manifest(self.tmp, rank, known=self.checksums)  # every rank, its own files
        barrier(self.group)
        if rank == 0:
            write_rank_manifest(self.tmp, 0, rest=True)  # files nobody else claimed
            (self.tmp / COMPLETE).write_text("ok\n")
            fsync_dir(self.tmp)
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
            fsync_dir(self.final.parent)
        barrier(self.group)

    def abandon(self) -> None:
        """Not collective (the other ranks may be gone): after a failure elsewhere, wait for
        this rank's writes and remove the partial folder."""
        if self.thread is not None:
            self.thread.join()
        if self.buffers is not None:
            self.buffers.release()
        shutil.rmtree(self.tmp, ignore_errors=True)


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
        try:
            tmp.mkdir(parents=True)
        except OSError as err:  # a read-only or full disk
            note = space_note(tmp, may_be_full=err.errno not in NOT_SPACE)
            raise CheckpointError(
                f"checkpoint {final.name} could not be written to {tmp}: {err}{note}"
            ) from None
    barrier(group)
    model_sd = sharded_model(chunks)
    sharded: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            flat_model_state(model_sd), metadata=OPTIMIZER_METADATA
        )
    strategy: Any = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=2)  # 2 files a rank
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    try:
        request = dist_checkpointing.save(
            sharded, str(tmp), sharded_strategy=strategy, async_sharded_save=True
        )
    except OSError as err:  # the common part (rank 0) failed, e.g. a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"checkpoint {final.name} could not be written to {tmp}: {err}{space_note(tmp)}; "
            "its partial files were removed"
        ) from None
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
