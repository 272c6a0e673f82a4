"""Weight sync by NCCL broadcast (disaggregated placement; GPUs only).

``init_weights_update_group`` makes a process group of the trainer (rank 0) and every TP rank of
every server (server i's ranks start at ``1 + i * tp_size``), rendezvousing at
``tcp://master_address:master_port``. Each bucket is then announced to every server with
``/update_weights_from_distributed`` (names, dtypes, shapes) while rank 0 broadcasts the tensors
in the same order; the servers receive and load them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch

from hpt_megatron.rollout.base import WeightBucket
from hpt_megatron.rollout.sglang.client import SGLangClient

GROUP_NAME = "hpt_weight_sync"


def bucket_announcement(bucket: WeightBucket, version: int, *, flush: bool) -> dict[str, Any]:
    """The ``/update_weights_from_distributed`` body for one bucket."""
    return {
        "names": [name for name, _ in bucket],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": GROUP_NAME,
        "flush_cache": flush,
        "weight_version": str(version),
    }


def new_trainer_group(
    master_address: str, master_port: int, world_size: int, timeout_s: float = 600.0
) -> Any:
    """Rank 0 of a new NCCL group, beside (not replacing) the trainer's default group.

    Uses torch's own rendezvous and group constructor, as ``init_process_group`` does, so that
    the servers (which join with the same group name) meet it in the same store namespace.
    """
    from torch.distributed import distributed_c10d as c10d

    store, _, _ = next(
        c10d.rendezvous(
            f"tcp://{master_address}:{master_port}",
            rank=0,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    )
    group, _ = c10d._new_process_group_helper(  # no public API builds a non-default group
        world_size,
        0,
        [],
        c10d.Backend("nccl"),
        store,
        group_name=GROUP_NAME,
        timeout=timedelta(seconds=timeout_s),
    )
    return group


class DistributedTransport:
    """Weight sync by NCCL broadcast from the trainer's rank 0.

    Args:
        master_address: address the servers can reach the trainer at.
        master_port: a free port there for the rendezvous.
        tp_size: tensor-parallel ranks per server.
    """

    name = "distributed"

    def __init__(self, master_address: str, master_port: int, tp_size: int) -> None:
        self.master_address = master_address
        self.master_port = master_port
        self.tp_size = tp_size
        self.group: Any = None

    async def init_group(self, client: SGLangClient) -> None:
        num_servers = len(client.pool.servers)
        world_size = 1 + num_servers * self.tp_size

        def body(i: int) -> dict[str, Any]:
            return {
                "master_address": self.master_address,
                "master_port": self.master_port,
                "rank_offset": 1 + i * self.tp_size,
                "world_size": world_size,
                "group_name": GROUP_NAME,
                "backend": "nccl",
            }

        # Both sides block in the rendezvous: run ours in a thread while the servers join.
        joined = asyncio.to_thread(
            new_trainer_group, self.master_address, self.master_port, world_size
        )
        self.group, *answers = await asyncio.gather(
            joined, client.post_all("/init_weights_update_group", body)
        )
        for answer in answers[0]:
            if not (isinstance(answer, dict) and answer.get("success")):
                raise RuntimeError(f"init_weights_update_group failed: {answer}")

    async def push(
        self, client: SGLangClient, buckets: Iterable[WeightBucket], version: int
    ) -> None:
        if self.group is None:
            await self.init_group(client)
        from hpt_megatron.rollout.sglang.weight_sync import weight_update_session

        buckets = [b for b in buckets if b]
        async with weight_update_session(client):
            for k, bucket in enumerate(buckets):
                body = bucket_announcement(bucket, version, flush=k == len(buckets) - 1)
                answers, _ = await asyncio.gather(
                    client.post_all("/update_weights_from_distributed", body),
                    asyncio.to_thread(self._broadcast, bucket),
                )
                for answer in answers:
                    if not (isinstance(answer, dict) and answer.get("success")):
                        raise RuntimeError(f"update_weights_from_distributed failed: {answer}")

    def _broadcast(self, bucket: WeightBucket) -> None:
        for _, tensor in bucket:
            torch.distributed.broadcast(tensor.detach().cuda(), group=self.group, group_src=0)
        torch.cuda.synchronize()

    async def resync(self, client: SGLangClient, index: int) -> None:
        """A restarted server has left the group; it is rebuilt before the next push."""
        self.group = None
