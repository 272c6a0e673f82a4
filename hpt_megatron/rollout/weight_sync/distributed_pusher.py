"""The trainer side of ``weight_sync: distributed`` and ``tensor`` in ``hpt train`` (see
``distributed.py`` and ``tensor.py``).

Every rank takes part in each push; the exporting rank of each pipeline stage (TP rank 0 of
data-parallel replica 0) owns one update group and broadcasts its own stage's buckets. The driver
runs the servers' side through its engine (``SGLangEngine.admin``): which servers, the sessions,
and the restarted ones. Each step ends with every rank's outcome gathered (small), so that a
failure on one rank raises on all of them with the same message, naming the server. Under
``tensor`` there are no groups: each exporting rank posts its buckets' shared-memory handles to
every server itself, the stages in turn, inside the same sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, TypeVar, cast

import torch
import torch.distributed as dist

from hpt_megatron.models.export import DEFAULT_BUCKET_BYTES, export_roles, rank_export_buckets
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rollout.weight_sync import tensor as tensor_sync
from hpt_megatron.rollout.weight_sync.base import WeightSink
from hpt_megatron.rollout.weight_sync.distributed import (
    DistributedTransport,
    SyncError,
    Target,
    UpdateGroup,
    group_name,
    read_back,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A push that lost a server on the way (its process died) is redone once over the others.
_ATTEMPTS = 2


class DistributedPusher:
    """Each stage's buckets broadcast into its update group (``tensor``: posted as shared
    handles), the stages in turn.

    Args:
        chunks: the policy's model chunks (wrapped or not).
        hf: the policy's HF config.
        ctx: this rank's parallel context.
        backend: ``gloo`` (CPU servers) or ``nccl``.
        kind: ``distributed`` (update groups) or ``tensor`` (handles to this host's memory).
        timeout_s: the bound of every join, broadcast and server call.
        check: ``rollout.sglang.check_weights``: each bucket is read back from every server
            right after its broadcast and compared exactly with what was sent.
        bucket_bytes: the export's bucket size.
    """

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        hf: HFModelConfig,
        ctx: ParallelContext,
        *,
        backend: str,
        timeout_s: float,
        kind: Literal["distributed", "tensor"] = "distributed",
        check: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self.modules = [getattr(c, "module", c) for c in chunks]
        self.hf = hf
        self.ctx = ctx
        self.backend = backend
        self.kind = kind
        self.timeout_s = timeout_s
        self.check = check
        self.bucket_bytes = bucket_bytes
        self.exports = export_roles(ctx)[0] and ctx.tp_rank == 0
        self.group: UpdateGroup | None = None
        self._run = ""  # the driver's transport's token in group names, shared at each push

    def push(self, version: int, sink: WeightSink | None) -> int:
        """Collective: the trainer's weights as ``version`` into every server. Returns the
        bytes this rank broadcast."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return self._push_once(version, sink)
            except SyncError as err:
                lost = self._together(partial(self._on_driver, sink, _lost))
                if not lost[0] or attempt == _ATTEMPTS:
                    raise
                logger.warning("weight push %d lost a server (%s): pushing again", version, err)
        raise AssertionError("unreachable")

    def _push_once(self, version: int, sink: WeightSink | None) -> int:
        ctx = self.ctx
        plan = self._together(partial(self._on_driver, sink, partial(_targets, stages=ctx.pp)))
        targets, generation, rebuild, self._run = cast(Any, plan[0])
        if rebuild and self.kind == "distributed":  # (tensor has no groups)
            self._together(partial(self._on_driver, sink, partial(_forget, generation - 1)))
            for stage in range(ctx.pp):
                self._together(partial(self._join, stage, targets, generation))
        self._together(partial(self._on_driver, sink, partial(_session, targets, _BEGIN)))
        done = [0, 0]  # bytes sent, tensors read back from each server (check_weights)
        try:
            for stage in range(ctx.pp):
                outcomes = self._together(partial(self._send, stage, version, targets))
                done = [done[0] + outcomes[ctx.rank][0], done[1] + sum(c for _, c in outcomes)]
        finally:
            self._together(partial(self._on_driver, sink, partial(_session, targets, _END)))
        sent, checked = done
        loaded = partial(_loaded, version=version, targets=targets, checked=checked)
        self._together(partial(self._on_driver, sink, loaded))
        return sent

    def _join(self, stage: int, targets: list[Target], generation: int) -> None:
        """(the stage's exporting rank) A fresh group with ``targets``."""
        if not (self.exports and self.ctx.pp_rank == stage):
            return
        if self.group is not None:
            self.group.destroy()
        name = group_name(self._run, generation, stage)
        self.group = UpdateGroup(name, targets, self.backend, self.timeout_s)
        self.group.join()

    def _send(self, stage: int, version: int, targets: list[Target]) -> tuple[int, int]:
        """(the stage's ranks) The stage's buckets, broadcast by its exporting rank; every rank
        of the stage runs the export (a TP collective) to its end, even after an error. With
        ``check``, each bucket is read back from every server before the next is exported
        (what was sent, against what each holds). Returns (bytes sent, tensors checked)."""
        if self.ctx.pp_rank != stage:
            return 0, 0
        error: BaseException | None = None
        sent = checked = 0
        served_as: dict[int, tuple[torch.dtype, ...]] = {}  # each server's, over the buckets
        buckets = rank_export_buckets(self.modules, self.hf, self.ctx, self.bucket_bytes)
        for bucket in buckets:
            if error is not None or not self.exports:
                continue
            try:
                if self.kind == "tensor":
                    tensor_sync.send(targets, bucket, version, self.timeout_s)
                elif self.group is not None:
                    self.group.send(bucket, version)
                else:
                    continue
                sent += sum(t.numel() * t.element_size() for _, t in bucket)
                if self.check:
                    checked += read_back(targets, iter([bucket]), self.timeout_s, served_as)
            except (SyncError, ValueError, RuntimeError) as err:
                error = err
        if error is not None:
            raise error
        return sent, checked

    def _on_driver(self, sink: Any, call: Callable[[Any, DistributedTransport], T]) -> T | None:
        """``call(engine, transport)`` on the driver (``None`` elsewhere)."""
        if not self.ctx.is_driver:
            return None
        transport = sink.transport
        assert isinstance(transport, DistributedTransport), f"weight_sync: {self.kind}'s engine"
        return call(sink, transport)

    def _together(self, work: Callable[[], T]) -> list[T]:
        """Run ``work`` on every rank; raise :class:`SyncError` on all of them if it failed on
        any (the messages joined). Returns every rank's result (the driver's first)."""
        result: Any = None
        error = ""
        try:
            result = work()
        except (SyncError, ValueError, RuntimeError) as err:
            error = str(err)
        outcomes: list[Any] = [(result, error)]
        if self.ctx.world_size > 1:
            outcomes = [None] * self.ctx.world_size
            dist.all_gather_object(outcomes, (result, error), group=self.ctx.cpu_group)
        errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(outcomes) if e]
        if errors:
            raise SyncError("; ".join(errors))
        return [r for r, _ in outcomes]

    def close(self) -> None:
        """This rank's side of its group (the servers stop, or the driver's engine destroys
        their side)."""
        if self.group is not None:
            self.group.destroy()
            self.group = None


# The driver's part of a push: each called with the engine and its transport.
_BEGIN, _END = "/begin_weight_update", "/end_weight_update"


def _targets(engine: Any, transport: DistributedTransport, stages: int) -> Any:
    return transport.targets(engine.client, stages)


def _forget(generation: int, engine: Any, transport: DistributedTransport) -> None:
    engine.admin(lambda client: transport.forget_groups(client, generation))


def _session(
    targets: list[Target], path: str, engine: Any, transport: DistributedTransport
) -> None:
    engine.admin(lambda client: transport.session(client, targets, path))


def _lost(engine: Any, transport: DistributedTransport) -> bool:
    return bool(engine.admin(transport.lost))


def _loaded(
    engine: Any,
    transport: DistributedTransport,
    *,
    version: int,
    targets: list[Target],
    checked: int,
) -> None:
    engine.weights_loaded(version, targets, checked)
