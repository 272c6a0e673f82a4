"""Data-parallel generation with the CPU engine: every rank of the run holds a replica.

Colocated, the trainer ranks have nothing to do while a batch is generated. Instead of one engine
on the driver (with the other ranks' threads lent to it), every rank holds its own
``HFCpuEngine`` replica and generates a contiguous share of the prompts on its own cores; the
driver gathers the shares back in prompt order. On a tiny model this is faster than one engine
on all the threads: small matrices and the Python decode loop do not split over threads, but
they do over processes (``benchmarks/generation_threads.py``).

The protocol rides on the driver's broadcasts, which the other ranks already wait in while the
driver makes a batch:

- driver: :class:`DataParallelEngine.generate` broadcasts a :class:`GenerateRequest` (every
  rank's prompts and the sampling), generates its own share, and gathers the others';
- other ranks: :func:`serve_requests` takes every broadcast, generates its share of each
  request, and returns the first broadcast object that is not a request (the step's batch).

Each replica's share is sampled with its own seed (the call's seed mixed with the replica's
index, ``rollout/seeds.py``), so a run is reproducible at a given world size. Weights reach every
replica through the in-memory weight pusher (``rollout/weight_sync/memory.py``, ``every_rank``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from hpt_megatron.parallel.runtime import ParallelContext, broadcast_from_driver
from hpt_megatron.rollout.base import Generation, SamplingParams, WeightBucket
from hpt_megatron.rollout.seeds import derive_seed

if TYPE_CHECKING:
    from hpt_megatron.rollout.cpu_engine import HFCpuEngine


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One ``generate`` call, split: ``shares[r]`` are replica ``r``'s prompts."""

    shares: list[list[list[int]]]
    params: SamplingParams

    def params_for(self, replica: int) -> SamplingParams:
        seed = self.params.seed
        if seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=derive_seed(seed, "replica", rank=replica))


def split_prompts(prompts: list[list[int]], replicas: int) -> list[list[list[int]]]:
    """Contiguous shares whose sizes differ by at most one (earlier shares are the larger)."""
    base, extra = divmod(len(prompts), replicas)
    shares, start = [], 0
    for r in range(replicas):
        end = start + base + (1 if r < extra else 0)
        shares.append(prompts[start:end])
        start = end
    return shares


class DataParallelEngine:
    """The driver's rollout engine when every rank holds a replica (implements ``RolloutEngine``).

    Args:
        local: the driver's own replica.
        ctx: the driver's parallel context (every rank of the run holds a replica).
    """

    def __init__(self, local: HFCpuEngine, ctx: ParallelContext) -> None:
        self.local = local
        self.ctx = ctx

    @property
    def weight_version(self) -> int:
        return self.local.weight_version

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """``params.n`` generations per prompt in prompt order, each replica making its share.

        A collective with :func:`serve_requests` on the other ranks."""
        world = self.ctx.world_size
        request = broadcast_from_driver(
            self.ctx, GenerateRequest(split_prompts(prompts, world), params)
        )
        own = self.local.generate(request.shares[0], request.params_for(0))
        gathered: list[Any] = [None] * world
        dist.gather_object(own, gathered, dst=0, group=self.ctx.cpu_group)
        out: list[Generation] = []
        offset = 0
        for share, generations in zip(request.shares, gathered):
            for gen in generations:
                out.append(dataclasses.replace(gen, prompt_index=gen.prompt_index + offset))
            offset += len(share)
        return out

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """The driver's replica only: the weight pusher hands every rank its buckets."""
        self.local.update_weights(buckets, version)

    def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        # Disk sync is SGLang's; loading here would leave the other replicas behind.
        raise RuntimeError("replicas take their weights in memory, on every rank (MemoryPusher)")

    def release_memory(self) -> None:
        self.local.release_memory()

    def resume_memory(self) -> None:
        self.local.resume_memory()

    def health(self) -> bool:
        return self.local.health()

    @property
    def restarts(self) -> int:
        return self.local.restarts

    def shutdown(self) -> None:
        self.local.shutdown()


def serve_requests(local: HFCpuEngine, ctx: ParallelContext) -> Any:
    """(every rank but the driver) Generate this rank's share of each request the driver
    broadcasts; return the first broadcast object that is not a request."""
    while True:
        request = broadcast_from_driver(ctx, None)
        if not isinstance(request, GenerateRequest):
            return request
        own = local.generate(request.shares[ctx.rank], request.params_for(ctx.rank))
        dist.gather_object(own, None, dst=0, group=ctx.cpu_group)
