"""Weight-sync transports into SGLang servers.

One transport remains: ``disk`` (safetensors snapshot + ``/update_weights_from_disk``), which works
for every placement, CPU included. ``WeightTransport`` is the interface a new transport (CUDA IPC
or NCCL, as a separate module here) would implement.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from hpt_megatron.rollout.base import WeightBucket
from hpt_megatron.rollout.sglang.client import SGLangClient


class WeightTransport(Protocol):
    name: str

    async def push(
        self, client: SGLangClient, buckets: Iterable[WeightBucket], version: int
    ) -> None:
        """Load ``buckets`` into every server as weight ``version`` (and flush their caches)."""
        ...

    async def resync(self, client: SGLangClient, index: int) -> None:
        """Bring a restarted server ``index`` back to the current weights, where possible."""
        ...
