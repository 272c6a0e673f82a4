"""Process groups from the torchrun environment, and Megatron's parallel state.

This module (with the rest of ``parallel/``) is the only code that reads
``megatron.core.parallel_state``; everything else receives a :class:`ParallelContext` whose
process groups are passed explicitly.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from hpt_megatron.config.base import ConfigError
from hpt_megatron.config.sections import ParallelConfig

T = TypeVar("T")


@dataclass(frozen=True)
class ParallelContext:
    """Ranks, sizes and the explicit process groups of this process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    vpp: int | None
    sequence_parallel: bool
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup  # data parallel (with context parallel folded in for grads)
    cpu_group: dist.ProcessGroup  # gloo group over all ranks, for small CPU-side collectives
    # Experts (mixture-of-experts models): ep ranks split the experts, etp ranks split each one,
    # expert_dp_rank counts the copies of this rank's experts (Megatron's expert layout).
    ep: int = 1
    ep_rank: int = 0
    etp: int = 1
    etp_rank: int = 0
    expert_dp_rank: int = 0
    etp_group: dist.ProcessGroup | None = None

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_driver(self) -> bool:
        """The rank that drives rollouts, logging and file writes."""
        return self.rank == 0


def check_world_size(parallel: ParallelConfig, world_size: int) -> int:
    """Return the data-parallel size, or raise naming the parallel keys.

    Experts have their own layout (Megatron's): ``etp x ep x pp`` ranks hold one copy of every
    expert, so that product must divide the world too.
    """
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel.tp * parallel.pp * parallel.cp = {parallel.tp} * {parallel.pp} * "
            f"{parallel.cp} = {model_parallel} does not divide the world size {world_size} "
            f"(launch with torchrun --nproc_per_node N, or change parallel.*)"
        )
    expert_parallel = parallel.expert_tp * parallel.ep * parallel.pp
    if world_size % expert_parallel:
        raise ConfigError(
            f"parallel.etp * parallel.ep * parallel.pp = {parallel.expert_tp} * {parallel.ep} * "
            f"{parallel.pp} = {expert_parallel} does not divide the world size {world_size} "
            f"(etp defaults to tp)"
        )
    return world_size // model_parallel


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_distributed(
    parallel: ParallelConfig, seed: int = 1234, timeout_s: float = 1800.0
) -> ParallelContext:
    """Initialise torch.distributed and Megatron's model-parallel state.

    ``timeout_s`` bounds every collective of the default group and of Megatron's groups
    (``fault.collective_timeout_s``); the hang watchdog normally reports a stall well before it.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (set by torchrun); a plain
    ``python -m ...`` gets a world of one, so single process and ``torchrun --nproc_per_node 1``
    run the same code. NCCL with GPUs, gloo (and the CPU compatibility layer) without.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_gpu = torch.cuda.is_available() and parallel.backend != "gloo"
    backend = "nccl" if use_gpu else "gloo"
    if parallel.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend: nccl needs GPUs; none are visible")
    check_world_size(parallel, world_size)
    timeout = datetime.timedelta(seconds=timeout_s)
    if use_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from hpt_megatron._compat.cpu import enable_cpu_mode

        enable_cpu_mode()
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        store = _store(rank, world_size, timeout)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            distributed_timeout_minutes=max(1, round(timeout_s / 60)),
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.vpp,
            context_parallel_size=parallel.cp,
            expert_model_parallel_size=parallel.ep,
            expert_tensor_parallel_size=parallel.expert_tp,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return _context(parallel, rank, world_size, local_rank, device, timeout)


def _context(
    parallel: ParallelConfig,
    rank: int,
    world_size: int,
    local_rank: int,
    device: torch.device,
    timeout: datetime.timedelta,
) -> ParallelContext:
    from megatron.core import parallel_state as ps

    world = dist.group.WORLD
    assert world is not None, "init_process_group has run"
    cpu_group = (
        world if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    )
    return ParallelContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        tp=parallel.tp,
        pp=parallel.pp,
        cp=parallel.cp,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        vpp=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        cpu_group=cpu_group,
        ep=parallel.ep,
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp=parallel.expert_tp,
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        etp_group=ps.get_expert_tensor_parallel_group(),
    )


def broadcast_from_driver(ctx: ParallelContext, obj: T) -> T:
    """The driver's ``obj`` on every rank (a blocking wait on the others, never a spin)."""
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=ctx.cpu_group)
    return box[0]


def _store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, its keys prefixed by torchrun's restart count: the agent's store
    outlives a restart, and without the prefix the restarted ranks would read the addresses of
    the ranks they replace and fail to connect."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"hpt/attempt_{attempt}/", store)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
