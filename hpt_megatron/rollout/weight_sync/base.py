"""What a weight transport implements: the trainer side (:class:`WeightPusher`), where it puts
the weights (:class:`WeightSink`), and the SGLang side (:class:`WeightTransport`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hpt_megatron.rollout.base import WeightBucket

if TYPE_CHECKING:
    from hpt_megatron.rollout.sglang.client import SGLangClient


class WeightSink(Protocol):
    """Where a rank's weights go: the engine, its replica, or a queue in front of the engine."""

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None: ...

    def update_weights_from_disk(self, path: str | Path, version: int) -> None: ...


class WeightPusher(Protocol):
    """The trainer's weights into the rollout engine, built once per run from the plan."""

    def push(self, version: int, sink: WeightSink | None) -> int:
        """Collective over all ranks: the trainer's current weights as ``version`` into
        ``sink`` (the driver's, or each rank's own where every rank loads; ``None`` on ranks
        that load nothing). Returns the bytes exported (on the ranks that load)."""
        ...

    def close(self) -> None:
        """At the end of the run: release what the pusher holds (process groups)."""
        ...


class WeightTransport(Protocol):
    """How an ``SGLangEngine`` loads weights into its servers."""

    name: str

    async def push(
        self, client: SGLangClient, buckets: Iterable[WeightBucket], version: int
    ) -> None:
        """Load ``buckets`` into every server as weight ``version`` (and flush their caches)."""
        ...

    async def resync(self, client: SGLangClient, index: int) -> None:
        """Bring a restarted server ``index`` back to the current weights, where possible."""
        ...

    async def close(self, client: SGLangClient) -> None:
        """At shutdown, before the servers stop: release what the transport holds on them."""
        ...
