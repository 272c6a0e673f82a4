"""Weight sync through the file system: HF safetensors folders, then ``/update_weights_from_disk``.

Works for every placement (CPU, colocated, disaggregated on a shared file system). Each version
is a folder ``<root>/v<version>`` (written as ``v<version>.tmp`` and renamed when complete,
``folder.py``), loaded by every server; once it is loaded, older versions in ``<root>`` are
deleted. The newest stays on disk so that a restarted server can be brought to the current
weights.

- Trainer side (:class:`DiskPusher`, ``hpt train``): each exporting rank writes its own
  safetensors shards straight into the version folder, bucket by bucket, so no rank holds more
  than its own stage's buckets plus one bucket in flight; after a barrier the driver writes the
  index (from the shard names every rank reports: small metadata), config.json and the
  tokenizer files, publishes the folder and hands it to its sink, which loads it on every
  server.
- Server side (:class:`DiskTransport`, an ``SGLangEngine``'s): ``/update_weights_from_disk`` on
  every server, resyncs of restarted servers, and :meth:`DiskTransport.push` for buckets in hand
  (one file per bucket, written from this process).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import torch
import torch.distributed as dist

from hpt_megatron.disk import writing
from hpt_megatron.models.export import DEFAULT_BUCKET_BYTES, merge_shard_index, write_rank_shards
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.hf_io import copy_side_files, write_config, write_safetensors
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rollout.base import WeightBucket
from hpt_megatron.rollout.weight_sync.base import WeightSink
from hpt_megatron.rollout.weight_sync.check import PRECISIONS, check_tensor
from hpt_megatron.rollout.weight_sync.folder import VersionFolder, dtype_name, write_version

if TYPE_CHECKING:
    from hpt_megatron.rollout.sglang.client import SGLangClient


class DiskPusher:
    """Every rank's shards into ``root/v<version>``, loaded by the driver's sink.

    Args:
        root: the folder of versions (``rollout.sglang.weight_sync_dir``, by default
            ``<run_dir>/rollout_weights``), one every rank can write and every server read.
        chunks: the policy's model chunks (wrapped or not).
        hf: the policy's HF config.
        ctx: this rank's parallel context.
        tokenizer: the driver's; saved once under ``root/tokenizer`` and its files copied into
            every version folder, so each one is a complete HF folder a server can start from.
        bucket_bytes: the export's bucket size.
    """

    def __init__(
        self,
        root: Path,
        chunks: list[torch.nn.Module],
        hf: HFModelConfig,
        ctx: ParallelContext,
        *,
        tokenizer: Any = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self.root = root
        self.modules = [getattr(c, "module", c) for c in chunks]
        self.hf = hf
        self.ctx = ctx
        self.tokenizer = tokenizer
        self.bucket_bytes = bucket_bytes

    def push(self, version: int, sink: WeightSink | None) -> int:
        """Collective: the version folder written by every rank; the driver publishes it and
        has ``sink`` load it. Returns the bytes written (on the driver)."""
        ctx = self.ctx
        folder = VersionFolder(self.root, version)
        what = "weight-sync folder"
        if ctx.is_driver:
            with writing(folder.tmp, what):
                folder.open()
        if ctx.world_size > 1:
            dist.barrier(group=ctx.cpu_group)  # the folder exists before anyone writes into it
        try:
            with writing(folder.tmp, what):
                mine = write_rank_shards(
                    self.modules, self.hf, folder.tmp, ctx, bucket_bytes=self.bucket_bytes
                )
                total = merge_shard_index(folder.tmp, ctx, mine)  # a barrier: all shards on disk
                if ctx.is_driver:
                    self._describe(folder.tmp)
        except BaseException:
            if ctx.is_driver:
                folder.discard()
            raise
        if not ctx.is_driver:
            return 0
        with writing(folder.final, what):
            final = folder.publish()
        assert sink is not None
        sink.update_weights_from_disk(final, version)
        return total

    def close(self) -> None:
        """Nothing held: the newest version stays on disk for restarted servers."""

    def _describe(self, folder: Path) -> None:
        """(driver) config.json and the tokenizer files next to the shards in ``folder``."""
        params_dtype = cast(Any, self.modules[0]).config.params_dtype
        write_config(self.hf, folder, torch_dtype=dtype_name(params_dtype))
        if self.tokenizer is None:
            return
        saved = self.root / "tokenizer"
        if not saved.is_dir():
            self.tokenizer.save_pretrained(str(saved))
        copy_side_files(saved, folder)


def write_snapshot(buckets: Iterable[WeightBucket], directory: Path, version: int) -> Path:
    """Write ``buckets`` as ``<directory>/v<version>/bucket-NNNNN.safetensors``; return the dir."""

    def fill(tmp: Path) -> None:
        count = 0
        for i, bucket in enumerate(buckets):
            write_safetensors(tmp / f"bucket-{i:05d}.safetensors", bucket)
            count += len(bucket)
        if count == 0:
            raise ValueError("update_weights: no tensors given")

    return write_version(directory, version, fill)


class DiskTransport:
    """Weight sync by safetensors snapshots under ``directory``."""

    name = "disk"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.latest: Path | None = None
        self.latest_version: int | None = None
        self.last_timing: dict[str, float] = {}

    async def push(
        self, client: SGLangClient, buckets: Iterable[WeightBucket], version: int
    ) -> None:
        """Write a snapshot of ``buckets`` and load it into every server."""
        t0 = time.perf_counter()
        path = await asyncio.to_thread(write_snapshot, buckets, self.directory, version)
        t1 = time.perf_counter()
        await self.load(client, path, version)
        t2 = time.perf_counter()
        self.last_timing = {"write_s": t1 - t0, "load_s": t2 - t1}

    async def load(
        self, client: SGLangClient, path: str | Path, version: int, index: int | None = None
    ) -> None:
        """``/update_weights_from_disk`` on every server (or only server ``index``).

        A server found dead on the way (its process gone, or its node's) is left to the pool:
        it is restarted and loads the newest folder then (``resync``); the others go on. An
        error of a live server, or every server down, raises.
        """
        payload = {"model_path": str(path), "weight_version": str(version), "flush_cache": True}
        if index is not None:  # a resync: the newest version is what it loads, and stays so
            await self._post(client, [index], payload, path, resync=True)
            return
        # The newest version from now on (the folder is complete): a restart that ends during
        # this load resyncs to it (``SGLangEngine._after_restart`` loops until ``latest`` holds).
        self.latest, self.latest_version = Path(path), version
        # A server being restarted is left out: it loads the newest folder once it is back
        # (``resync``), and a load reaching it mid-resync would race with that one.
        targets = _up(client)
        down = await self._post(client, targets, payload, path)
        if not targets or down == len(targets):
            raise RuntimeError(f"update_weights_from_disk({path}): every server is down")
        # A restart that ended while this load was under way resynced an older version (it
        # compared ``latest`` before this load began): this one goes to it too.
        late = [i for i in _up(client) if i not in targets]
        if late:
            await self._post(client, late, payload, path)
        if Path(path).parent.resolve() == self.directory.resolve():
            self._forget_older_than(version)  # one of this transport's own version folders

    @staticmethod
    async def _post(
        client: SGLangClient,
        targets: list[int],
        payload: dict[str, Any],
        path: str | Path,
        resync: bool = False,
    ) -> int:
        """Post the load to ``targets``; returns how many were found dead (left to the pool's
        restart, except in a ``resync``, where that raises)."""
        answers = await asyncio.gather(
            *(client.post(i, "/update_weights_from_disk", payload) for i in targets),
            return_exceptions=True,
        )
        down = 0
        for i, answer in zip(targets, answers):
            if isinstance(answer, _LOST):
                if not resync and await client.pool.report_failure(i, grace_s=_DYING_S):
                    down += 1
                    continue
                raise RuntimeError(f"update_weights_from_disk({path}) failed: {answer!r}")
            if isinstance(answer, BaseException):
                raise answer
            if not (isinstance(answer, dict) and answer.get("success")):
                raise RuntimeError(f"update_weights_from_disk({path}) failed: {answer}")
        return down

    async def resync(self, client: SGLangClient, index: int) -> None:
        """Bring a restarted server ``index`` to the newest pushed weights (if any)."""
        if self.latest is not None and self.latest_version is not None:
            await self.load(client, self.latest, self.latest_version, index=index)

    async def close(self, client: SGLangClient) -> None:
        """Nothing held on the servers (the folders stay, as the run's record)."""

    def _forget_older_than(self, version: int) -> None:
        """Delete this transport's folders of versions below ``version`` (``v<N>``, and the
        partial ``v<N>.tmp`` of a crash); newer ones may still be being written."""
        for old in self.directory.glob("v*"):
            number = old.name.removeprefix("v").removesuffix(".tmp")
            if number.isdigit() and int(number) < version and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)


def _up(client: SGLangClient) -> list[int]:
    """The servers up now (one being restarted loads and is checked after its resync)."""
    return [i for i, state in enumerate(client.pool.state) if state == "up"]


_LOST = (aiohttp.ClientError, asyncio.TimeoutError, OSError)  # no answer from a server


# A server that dropped its connection may take a moment to be seen dead (``report_failure``).
_DYING_S = 3.0


async def check_loaded(client: SGLangClient, path: str | Path, index: int | None = None) -> int:
    """Read every tensor of the folder ``path`` back from each server (or server ``index``) with
    ``/get_weights_by_name`` and raise ``RuntimeError`` naming the server and tensor unless it
    equals the file's rounded to the precision the server runs in, exactly (``check.py``).
    Returns the tensors checked per server.

    A debugging check (``rollout.sglang.check_weights``): every tensor crosses HTTP as JSON.
    """
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(shard))
    if not tensors:
        raise RuntimeError(f"check_weights: no tensors in {path}")
    indices = _up(client) if index is None else [index]
    for i in indices:
        url = client.pool.servers[i].url
        served_as = PRECISIONS  # the precisions the server may run in, narrowed per tensor
        for name, tensor in tensors.items():
            rows = tensor.shape[0] if tensor.dim() else 1  # the answer keeps that many rows
            payload = {"name": name, "truncate_size": max(1, rows)}
            try:
                answer = await client.post(i, "/get_weights_by_name", payload)
            except RuntimeError as err:  # a non-200 answer: SGLang could not map the name
                raise RuntimeError(f"check_weights: {url} cannot return {name}: {err}") from None
            except _LOST as err:
                if index is None and await client.pool.report_failure(i, grace_s=_DYING_S):
                    break  # died after its load: checked again after its restart and resync
                raise RuntimeError(f"check_weights: {url} lost reading {name}: {err!r}") from None
            served_as = check_tensor(url, name, tensor, answer, served_as, str(path))
    return len(tensors)
