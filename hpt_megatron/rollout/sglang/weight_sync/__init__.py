"""Weight-sync transports into SGLang servers, one module each (chosen by placement).

- ``disk``: safetensors snapshot + ``/update_weights_from_disk`` (any placement, CPU included);
- ``tensor``: flattened buckets by IPC handle + ``/update_weights_from_tensor`` (colocated);
- ``distributed``: NCCL broadcast + ``/update_weights_from_distributed`` (disaggregated).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
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


@contextlib.asynccontextmanager
async def weight_update_session(client: SGLangClient) -> AsyncIterator[None]:
    """``/begin_weight_update`` ... ``/end_weight_update`` on every server.

    SGLang 0.5.23 accepts ``update_weights_from_tensor`` and ``update_weights_from_distributed``
    only inside such a session (it restores in-place-packed weights first).
    """
    await _check_all(client, "/begin_weight_update")
    try:
        yield
    finally:
        await _check_all(client, "/end_weight_update")


async def _check_all(client: SGLangClient, path: str) -> None:
    for answer in await client.post_all(path, {}):
        if not (isinstance(answer, dict) and answer.get("success")):
            raise RuntimeError(f"{path} failed: {answer}")
