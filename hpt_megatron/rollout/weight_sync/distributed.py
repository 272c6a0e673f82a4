"""Weight sync over process groups: SGLang's ``/init_weights_update_group`` and
``/update_weights_from_distributed`` (gloo on CPU servers, NCCL on GPU ones: the same code).

Each exporting rank (TP rank 0 of data-parallel replica 0 of each pipeline stage) owns one update
group with every server: it is rank 0, the servers follow (``rank_offset``: one rank per server
TP rank). No rank gathers another's weights: each broadcasts its own stage's buckets.

- Trainer side (:class:`DistributedPusher`, ``hpt train``, colocated): the stages take turns,
  because a server's scheduler handles one group at a time (two stages broadcasting at once to
  two servers that took their requests in opposite orders would wait on each other). Per push:
  the driver names the servers (:meth:`DistributedTransport.targets`); the groups are (re)built
  when the set changed (a restarted server joins a fresh group); ``/begin_weight_update``; one
  ``/update_weights_from_distributed`` per bucket while its stage broadcasts it;
  ``/end_weight_update``; with ``check_weights``, each bucket is read back from every
  server right after its broadcast.
- Server side (:class:`DistributedTransport`, an ``SGLangEngine``'s): the sessions, the groups'
  names, and the restarted servers, held out of generation until the next push resyncs them
  (their weights live only on the trainer ranks, which are busy while the driver generates).

Every blocking HTTP call that waits on the trainer side goes from a thread while the caller
joins or broadcasts; every wait is bounded by ``rollout.sglang.weight_sync_timeout_s``.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import logging
import os
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import torch
import torch.distributed as dist

from hpt_megatron.rollout.base import WeightBucket
from hpt_megatron.rollout.weight_sync.check import PRECISIONS, check_tensor

if TYPE_CHECKING:
    from hpt_megatron.rollout.sglang.client import SGLangClient

logger = logging.getLogger(__name__)

# The dtypes a server can allocate a receive buffer for (``getattr(torch, name)``).
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Target:
    """A server an update group feeds: its index in the engine, URL, headers, TP ranks."""

    index: int
    url: str
    headers: dict[str, str]
    tp_size: int = 1


class SyncError(RuntimeError):
    """A server refused, or did not answer, a step of the weight sync (the message names it)."""


def post(target: Target, path: str, payload: dict[str, Any], timeout_s: float) -> Any:
    """POST JSON to ``target`` (blocking); :class:`SyncError` naming the server unless it
    answers 200 with ``success`` (where the answer has one)."""
    request = urllib.request.Request(
        target.url + path,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **target.headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")[:2000]
        raise SyncError(f"{target.url}{path} answered {err.code}: {text}") from None
    except (urllib.error.URLError, OSError) as err:
        raise SyncError(f"{target.url}{path}: no answer ({err})") from None
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    if isinstance(answer, dict) and answer.get("success") is False:
        raise SyncError(f"{target.url}{path} refused: {answer.get('message', answer)}")
    return answer


def post_each(
    targets: list[Target],
    path: str,
    payloads: list[dict[str, Any]],
    timeout_s: float,
    work: Any = None,
) -> list[tuple[Target, BaseException]]:
    """POST ``payloads[i]`` to ``targets[i]``, all at once from threads (while ``work()``, when
    given, runs here); returns each target that failed, with its :class:`SyncError`."""
    with ThreadPoolExecutor(len(targets)) as pool:
        answers: list[Future[Any]] = [
            pool.submit(post, t, path, p, timeout_s) for t, p in zip(targets, payloads)
        ]
        if work is not None:
            work()
        return [(t, err) for t, a in zip(targets, answers) if (err := a.exception()) is not None]


def trainer_host(targets: Iterable[Target]) -> str:
    """The address the servers reach this rank at: loopback when every one is local."""
    local = ("127.0.0.1", "localhost", "[::1]")
    if all(any(f"//{h}:" in t.url for h in local) for t in targets):
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


def validate_bucket(bucket: WeightBucket) -> None:
    """Raise ``ValueError`` naming the tensor unless every one is something a server can
    receive: a non-empty name, a float dtype it allocates, on a device this backend sends."""
    for name, tensor in bucket:
        if not isinstance(name, str) or not name:
            raise ValueError(f"weight sync: a tensor without a name ({name!r})")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"weight sync: {name} is {tensor.dtype}, not one of float32/16, bf16")
        if tensor.is_sparse or tensor.numel() == 0:
            raise ValueError(f"weight sync: {name} is sparse or empty {tuple(tensor.shape)}")


class UpdateGroup:
    """The trainer side (rank 0) of one update group with ``targets``.

    Joined the way SGLang's ``init_custom_process_group`` builds the servers' side: a TCP store
    (this rank its master), wrapped in a ``PrefixStore`` named after the group, then a new
    process group on it (a plain ``init_process_group`` does not match and times out).
    """

    def __init__(self, name: str, targets: list[Target], backend: str, timeout_s: float) -> None:
        self.name = name
        self.targets = targets
        self.backend = backend
        self.timeout_s = timeout_s
        self.world_size = 1 + sum(t.tp_size for t in targets)
        self.group: Any = None
        self._store: Any = None

    def join(self) -> None:
        """Create the group: every server asked to join (from threads) while this rank joins;
        :class:`SyncError` naming each server that refused or did not answer."""
        from torch.distributed.distributed_c10d import (
            Backend,
            PrefixStore,
            _new_process_group_helper,
            _world,
        )

        for target in self.targets:  # a server that cannot answer is named before any joins
            _health(target)
        host = trainer_host(self.targets)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self._store = dist.TCPStore(
            host, 0, self.world_size, True, timeout=timeout, wait_for_workers=False
        )
        offsets = itertools.accumulate([1] + [t.tp_size for t in self.targets[:-1]])
        payloads = [
            {
                "master_address": host,
                "master_port": self._store.port,
                "rank_offset": offset,
                "world_size": self.world_size,
                "group_name": self.name,
                "backend": self.backend,
            }
            for offset in offsets
        ]

        def create() -> None:
            self.group, _ = _new_process_group_helper(
                self.world_size,
                0,
                [],
                Backend(self.backend),
                PrefixStore(self.name, self._store),
                group_name=cast(Any, self.name),
                timeout=timeout,
            )
            _world.pg_group_ranks[self.group] = {i: i for i in range(self.world_size)}

        self._while_posting("/init_weights_update_group", payloads, create)

    def send(self, bucket: WeightBucket, version: int) -> None:
        """Broadcast ``bucket`` to the group while every server receives and loads it."""
        validate_bucket(bucket)
        payload = {
            "names": [name for name, _ in bucket],
            "dtypes": [_DTYPES[t.dtype] for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.name,
            "flush_cache": True,
            "weight_version": str(version),
        }
        device = "cuda" if self.backend == "nccl" else "cpu"

        def broadcast() -> None:
            for _, tensor in bucket:
                dist.broadcast(tensor.to(device).contiguous(), group_src=0, group=self.group)

        self._while_posting("/update_weights_from_distributed", [payload] * len(self), broadcast)

    def __len__(self) -> int:
        return len(self.targets)

    def _while_posting(self, path: str, payloads: list[dict[str, Any]], work: Any) -> None:
        """Post ``payloads[i]`` to target ``i`` while ``work()`` runs here (:func:`post_each`);
        raise :class:`SyncError` naming every server that failed (before ``work``'s own
        error)."""
        problem: list[BaseException] = []

        def guarded() -> None:
            try:
                work()
            except (RuntimeError, ValueError) as err:  # (DistBackendError is a RuntimeError)
                problem.append(err)

        failed = post_each(self.targets, path, payloads, self.timeout_s, guarded)
        if failed:
            why = "; ".join(str(err) for _, err in failed)
            raise SyncError(f"weight sync group {self.name}: {why}")
        if problem:
            raise SyncError(f"weight sync group {self.name}: {path}: {problem[0]}") from problem[0]

    def destroy(self) -> None:
        """This rank's side of the group (the servers' is destroyed by the driver)."""
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
        self._store = None


def _health(target: Target) -> None:
    request = urllib.request.Request(target.url + "/health", headers=target.headers)
    try:
        with urllib.request.urlopen(request, timeout=10.0):
            return
    except (urllib.error.URLError, OSError) as err:
        raise SyncError(f"weight sync: {target.url} does not answer /health ({err})") from None


def group_name(run: str, generation: int, stage: int) -> str:
    """The name of stage ``stage``'s group in the ``generation``-th set of groups of a run."""
    return f"hpt-{run}-g{generation}-pp{stage}"


def new_run_token() -> str:
    """Distinguishes this run's groups from any other trainer's on the same servers."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def read_back(
    targets: list[Target],
    buckets: Iterator[WeightBucket],
    timeout_s: float,
    served_as: dict[int, tuple[torch.dtype, ...]] | None = None,
) -> int:
    """``check_weights``: every tensor of ``buckets`` read back from each target
    (``/get_weights_by_name``) and compared exactly, rounded to the precision the target runs
    in (``check.py``); returns the tensors checked per server.

    ``served_as``: per target index, the precisions it may run in, narrowed by each tensor
    checked (pass the same dict for every bucket of a push; missing targets start from all).
    """
    served_as = {} if served_as is None else served_as
    count = 0
    for bucket in buckets:
        for name, tensor in bucket:
            count += 1
            for t in targets:
                rows = tensor.shape[0] if tensor.dim() else 1
                payload = {"name": name, "truncate_size": max(1, rows)}
                try:
                    answer = post(t, "/get_weights_by_name", payload, timeout_s)
                except SyncError as err:
                    raise SyncError(f"check_weights: {t.url} cannot return {name}: {err}") from None
                served_as[t.index] = check_tensor(
                    t.url, name, tensor, answer, served_as.get(t.index, PRECISIONS), "the trainer's"
                )
    return count


class DistributedTransport:
    """The engine's side of ``weight_sync: distributed``: sessions, group names, restarts.

    Args:
        backend: ``gloo`` (CPU servers) or ``nccl`` (GPU servers).
        timeout_s: the bound of every join, broadcast and admin call.
    """

    name = "distributed"

    def __init__(self, backend: str, timeout_s: float, tp_size: int = 1) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.tp_size = tp_size
        self.run = new_run_token()
        self.generation = 0  # bumped whenever the set of servers in the groups changes
        self.members: list[int] = []  # the servers in the current groups
        self.former: list[int] = []  # and in the groups before them
        self.stages = 1  # groups per generation (one per pipeline stage)
        self.latest = None  # no folder: the weights live on the trainer ranks only
        self._own: UpdateGroup | None = None  # the engine's own group (``push``)

    def targets(self, client: SGLangClient, stages: int = 1) -> tuple[list[Target], int, bool, str]:
        """(driver) The servers to feed (up, held ones included: the push resyncs them), the
        groups' generation, whether the groups (one per stage) must be (re)built, and the
        run's token in their names."""
        self.stages = stages
        pool = client.pool
        up = [i for i, s in enumerate(pool.state) if s == "up"]
        if not up:
            raise SyncError("weight sync: every SGLang server is down")
        rebuild = up != self.members or bool(pool.held)
        if rebuild:
            self.generation += 1
            self.former, self.members = self.members, up
        targets = [
            Target(i, pool.servers[i].url, pool.servers[i].auth_headers(), self.tp_size) for i in up
        ]
        return targets, self.generation, rebuild, self.run

    async def lost(self, client: SGLangClient) -> bool:
        """(driver, after a failed push) Whether a member died on the way: it is restarted,
        and the push can go again over the others."""
        down = [await client.pool.report_failure(i, grace_s=3.0) for i in self.members]
        return any(down)

    async def forget_groups(self, client: SGLangClient, generation: int) -> None:
        """(driver) Destroy the servers' side of the groups of ``generation`` (the current or
        the one before; on their members still up: a restarted one holds none)."""
        members = self.members if generation == self.generation else self.former
        if generation < 1:
            return
        old = generation
        for i in members:
            if client.pool.state[i] != "up" or i in client.pool.held:
                continue
            for stage in range(self.stages):
                payload = {"group_name": group_name(self.run, old, stage)}
                try:
                    await client.post(i, "/destroy_weights_update_group", payload, timeout_s=30.0)
                except Exception as err:  # a restarted server holds no old group
                    logger.debug("destroy_weights_update_group on server %d: %r", i, err)

    async def session(self, client: SGLangClient, targets: list[Target], path: str) -> None:
        """(driver) ``/begin_weight_update`` or ``/end_weight_update`` on every target;
        :class:`SyncError` naming each server that refused or did not answer (a dead one).

        Every target is asked even after a failure, and a begin that failed on one closes the
        sessions it opened on the others: a server refuses a second begin, so a push that is
        redone must find none open."""
        failed: list[str] = []
        opened: list[Target] = []
        for t in targets:
            why = await self._call(client, t, path)
            if why is None:
                opened.append(t)
            else:
                failed.append(why)
        if not failed:
            return
        if path == "/begin_weight_update":
            for t in opened:
                await self._call(client, t, "/end_weight_update")
        raise SyncError("weight sync: " + "; ".join(failed))

    async def _call(self, client: SGLangClient, target: Target, path: str) -> str | None:
        """POST ``path`` to ``target``: ``None``, or why it failed (naming the server)."""
        try:
            answer = await client.post(target.index, path, {}, timeout_s=self.timeout_s)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, RuntimeError) as err:
            return f"{target.url}{path}: no answer ({err!r})"
        if isinstance(answer, dict) and answer.get("success") is False:
            return f"{target.url}{path} refused: {answer.get('message')}"
        return None

    def loaded(self, client: SGLangClient) -> list[int]:
        """(driver) The push reached every member: the held ones serve again. Returns the
        servers that were resynced."""
        resynced = sorted(client.pool.held.intersection(self.members))
        client.pool.held.difference_update(self.members)
        return resynced

    async def push(
        self, client: SGLangClient, buckets: Iterable[WeightBucket], version: int
    ) -> None:
        """Buckets in this process's hands: the engine is the only exporter (one group)."""
        targets, generation, rebuild, _ = self.targets(client)
        if rebuild:
            await self.forget_groups(client, generation - 1)
            if self._own is not None:
                self._own.destroy()
            self._own = UpdateGroup(
                group_name(self.run, generation, 0), targets, self.backend, self.timeout_s
            )
            await asyncio.to_thread(self._own.join)
        group = self._own
        assert group is not None
        await self.session(client, targets, "/begin_weight_update")
        try:
            for bucket in buckets:
                await asyncio.to_thread(group.send, bucket, version)
        finally:
            await self.session(client, targets, "/end_weight_update")
        self.loaded(client)

    async def resync(self, client: SGLangClient, index: int) -> None:
        """A restarted server serves its start weights: held out of generation until the
        next push brings it into fresh groups with the current weights."""
        logger.warning(
            "sglang server %s restarted: held out of generation until the next weight push "
            "resyncs it (weight_sync: %s keeps no copy of the weights)",
            client.pool.servers[index].url,
            self.name,
        )
        client.pool.held.add(index)

    async def close(self, client: SGLangClient) -> None:
        """At shutdown: the servers' side of the current groups (servers of ``urls`` keep
        running) and the engine's own group (the trainer ranks destroy theirs)."""
        await self.forget_groups(client, self.generation)
        self.members = []
        if self._own is not None:
            self._own.destroy()
            self._own = None
