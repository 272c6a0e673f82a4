"""The rollout plan: how a run generates and syncs weights, decided once from the config and the
world, then handed to whoever builds or drives an engine (``rollout/factory.py``, the weight
pusher ``rollout/weight_sync/``, the loop, preflight).

Every rank computes the same plan from the same config (the threads from its own node's cores).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from hpt_megatron.config import HPTConfig
from hpt_megatron.config.rollout import RolloutConfig

Transport = Literal["memory", "disk", "distributed", "tensor"]


@dataclass(frozen=True, kw_only=True)
class ThreadCounts:
    """The intra-op threads of each party that generates or trains on a node.

    Attributes:
        generation: the CPU engine's threads while it generates (``None``: no CPU engine).
        server: each CPU SGLang server's ``OMP_NUM_THREADS`` (``None``: the run launches none).
        trainer: this rank's torch threads while CPU servers generate beside it (``None``: as
            torch set them).
    """

    generation: int | None = None
    server: int | None = None
    trainer: int | None = None


@dataclass(frozen=True, kw_only=True)
class RolloutPlan:
    """What a run's rollout side does, decided once (:func:`rollout_plan`).

    Attributes:
        engine: the engine the driver builds; ``None`` for a replay of recorded batches (no
            engine, no weight sync).
        colocated: generation and training take turns on the same devices (``run.placement``);
            otherwise a producer generates ahead while the trainer trains.
        data_parallel: every rank holds a CPU engine replica and generates its share of each
            call (``rollout/replicas.py``).
        launches_servers: the run starts SGLang servers of its own (not ``urls``).
        threads: the thread counts of this node's generation and training.
        rollout: the ``rollout`` section as the engine is built from it (``sglang_rollout``).
        transport: how the trainer's weights reach the engine (``None``: a replay syncs none):
            ``disk`` (SGLang: every exporting rank writes its shards of a version folder),
            ``distributed`` (SGLang, ``weight_sync: distributed``: every exporting rank
            broadcasts its buckets into its update group with the servers), ``tensor``
            (SGLang, ``weight_sync: tensor``: every exporting rank posts handles to its
            buckets' memory, on the servers' host) or ``memory`` (the in-process CPU engine:
            buckets over the CPU group).
        transport_reason: why that transport (``weight_sync_choice``), for the log.
        every_rank_loads: the weights go to every rank (each loads its replica), not only to
            the driver. Every rank sends: each exports the shards it holds.
        sync_dir: the disk transport's folder of versions (``None`` for ``memory``).
    """

    engine: Literal["cpu", "sglang"] | None
    colocated: bool
    data_parallel: bool
    launches_servers: bool
    threads: ThreadCounts
    rollout: RolloutConfig
    transport: Transport | None
    transport_reason: str
    every_rank_loads: bool
    sync_dir: Path | None


def rollout_plan(cfg: HPTConfig, world_size: int, cores: int | None = None) -> RolloutPlan:
    """The plan of ``cfg`` over ``world_size`` ranks (``cores``: this process's, by default)."""
    replay = bool(cfg.run.replay_rollouts)
    data_parallel = data_parallel_generation(cfg, world_size)
    transport, why = weight_sync_choice(cfg, world_size)
    rollout = sglang_rollout(cfg, cores)
    if transport in ("disk", "distributed", "tensor"):  # the engine's side follows the choice
        sglang = dataclasses.replace(rollout.sglang, weight_sync=transport)
        rollout = dataclasses.replace(rollout, sglang=sglang)
    return RolloutPlan(
        engine=None if replay else cfg.rollout.engine,
        colocated=cfg.run.placement == "colocated",
        data_parallel=data_parallel,
        launches_servers=launches_sglang_servers(cfg),
        threads=thread_counts(cfg, data_parallel, cores),
        rollout=rollout,
        transport=transport,
        transport_reason=why,
        every_rank_loads=data_parallel,
        sync_dir=cfg.rollout.sglang.sync_dir(cfg.run.run_dir) if transport == "disk" else None,
    )


def weight_sync_choice(cfg: HPTConfig, world_size: int) -> tuple[Transport | None, str]:
    """How the trainer's weights reach the engine, and why (``rollout.sglang.weight_sync``;
    ``auto`` decides here).

    ``auto`` picks ``tensor`` for GPU servers the run launches on its one node, colocated,
    without expert parallelism (CUDA IPC: no copy through the disk or the network); ``disk``
    everywhere else, each case saying why. On CPU servers ``tensor`` measured no faster than
    disk (0.95x on a Qwen2.5-0.5B shape, PP=2, two servers:
    ``benchmarks/weight_sync_transports.py``) and, like ``distributed``, keeps no copy of the
    weights, so a restarted server waits for the next push where disk reloads it at once.
    """
    if cfg.run.replay_rollouts:
        return None, "a replay of recorded batches syncs no weights"
    if cfg.rollout.engine != "sglang":
        return "memory", "the in-process CPU engine: buckets over the CPU process group"
    sglang = cfg.rollout.sglang
    if sglang.weight_sync != "auto":
        return sglang.weight_sync, "rollout.sglang.weight_sync names it"
    if sglang.urls:
        why = "the servers of rollout.sglang.urls may run on another host and join no group"
    elif cfg.run.placement != "colocated":
        why = "disaggregated: the servers generate while the trainer pushes"
    elif cfg.parallel.ep > 1:
        why = "expert parallelism: several ranks of a stage export"
    elif spans_nodes(world_size):
        why = (
            "several nodes: tensor needs the servers on the trainer's host, and distributed "
            "over several nodes is not chosen automatically (set weight_sync: distributed)"
        )
    elif sglang.device == "cpu":
        why = (
            "CPU servers: tensor is no faster than disk there, and disk reloads a restarted "
            "server at once (set weight_sync: tensor or distributed to use them)"
        )
    else:
        return "tensor", "colocated GPU servers on this node: CUDA IPC handles, no copy"
    return "disk", why


def spans_nodes(world_size: int) -> bool:
    """Whether the run's ``world_size`` ranks are on several nodes (torchrun's
    ``LOCAL_WORLD_SIZE`` below it; unknown outside torchrun: one node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size


def launches_sglang_servers(cfg: HPTConfig) -> bool:
    """Whether the run starts SGLang servers of its own (``rollout.engine: sglang`` without
    ``urls``, not a replay of recorded batches)."""
    rollout = cfg.rollout
    return rollout.engine == "sglang" and not rollout.sglang.urls and not cfg.run.replay_rollouts


def data_parallel_refusal(cfg: HPTConfig) -> str | None:
    """Why every rank generating with its own CPU engine cannot run under ``cfg`` (``None``:
    it can). Preflight rejects ``rollout.cpu.data_parallel: true`` with this reason."""
    if cfg.rollout.engine != "cpu":
        return f"rollout.engine is {cfg.rollout.engine} (SGLang servers are data-parallel)"
    if cfg.run.placement != "colocated":
        return "disaggregated placement generates in the driver while the other ranks train"
    if cfg.run.replay_rollouts:
        return "run.replay_rollouts trains recorded batches and generates nothing"
    return None


def data_parallel_generation(cfg: HPTConfig, world_size: int) -> bool:
    """Whether every rank holds a CPU engine replica and generates its share of the prompts
    (``rollout.cpu.data_parallel``; auto: colocated CPU-engine runs over several ranks)."""
    if cfg.rollout.cpu.data_parallel is False or world_size == 1:
        return False
    return data_parallel_refusal(cfg) is None  # (preflight rejected ``true`` where it cannot run)


def thread_counts(
    cfg: HPTConfig, data_parallel: bool = False, cores: int | None = None
) -> ThreadCounts:
    """Every thread count of the run on this node: the CPU engine's (``generation_threads``),
    or the CPU SGLang servers' and the trainer ranks' beside them (``cpu_thread_split``)."""
    if cfg.run.replay_rollouts:
        return ThreadCounts()
    if cfg.rollout.engine == "cpu":
        return ThreadCounts(generation=generation_threads(cfg, data_parallel))
    split = cpu_thread_split(cfg, cores)
    if split is None:
        return ThreadCounts()
    return ThreadCounts(server=split[0], trainer=split[1])


def cpu_thread_split(cfg: HPTConfig, cores: int | None = None) -> tuple[int, int | None] | None:
    """The threads of each CPU SGLang server the run launches on a node, and of each trainer rank
    of that node (``None``: as torch set them); ``None`` when the run launches no CPU servers.

    ``cores``: the cores this process may run on (the node's, by default). Colocated, generation
    and training take turns, so the node's servers share all its cores (without it a server
    inherits torchrun's ``OMP_NUM_THREADS=1`` and generates on one core while the trainer ranks
    wait) and the trainer keeps its threads. Disaggregated, both run at the same time: the
    servers take half the cores and the node's trainer ranks (``LOCAL_WORLD_SIZE``) the rest.
    Each running as many OpenMP threads as there are cores, on the same cores, made both about
    2x slower (``benchmarks/async_speedup.py``: the update took 10-14 s against 1 s alone).
    ``rollout.sglang.cpu_threads`` sets the servers' share.
    """
    sglang = cfg.rollout.sglang
    if not launches_sglang_servers(cfg) or sglang.device != "cpu":
        return None
    cores = cores or len(os.sched_getaffinity(0))
    colocated = cfg.run.placement == "colocated"
    share = cores if colocated else max(1, cores // 2)
    server = sglang.cpu_threads or max(1, share // sglang.servers_per_node)
    if colocated:
        return server, None
    node_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return server, max(1, (cores - server * sglang.servers_per_node) // node_ranks)


def generation_threads(cfg: HPTConfig, data_parallel: bool = False) -> int:
    """The CPU engine's intra-op threads while it generates (``rollout.cpu.threads``).

    Auto, colocated with data-parallel generation: every rank of the node generates at once, so
    each takes its share of the cores (at least its own threads). Auto, colocated without it: the
    other trainer ranks of this node wait in a collective while the driver generates (gloo's wait
    does not spin), so their threads go to generation: the node's ranks (torchrun's
    ``LOCAL_WORLD_SIZE``) times this rank's threads, at most the cores this process may run on.
    Auto, disaggregated: the producer generates while the trainer trains, so this rank's own
    threads.
    """
    if cfg.rollout.cpu.threads:
        return cfg.rollout.cpu.threads
    own = torch.get_num_threads()
    if cfg.run.placement != "colocated":
        return own
    node_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0))
    if data_parallel:
        return max(own, cores // node_ranks)
    return max(1, min(node_ranks * own, cores))


MEMORY_SAVER = "--enable-memory-saver"


def adds_memory_saver(cfg: HPTConfig) -> bool:
    """Colocated GPU servers the run launches get SGLang's memory saver when the user did not
    ask for it: the loop releases their memory while the trainer runs, which does nothing
    without it."""
    sglang = cfg.rollout.sglang
    return (
        launches_sglang_servers(cfg)
        and sglang.device != "cpu"
        and cfg.run.placement == "colocated"
        and MEMORY_SAVER not in sglang.extra_args
    )


def sglang_rollout(cfg: HPTConfig, cores: int | None = None) -> RolloutConfig:
    """The ``rollout`` section as the engine takes it: SGLang servers of a served checkpoint are
    told the trainer's RoPE settings (``model.rope_theta``, ``max_position_embeddings``), CPU
    servers their threads (``cpu_thread_split``), colocated GPU servers the memory saver
    (``adds_memory_saver``). Other engines take it as it is."""
    rollout = cfg.rollout
    if rollout.engine != "sglang":
        return rollout
    if adds_memory_saver(cfg):
        extra = [*rollout.sglang.extra_args, MEMORY_SAVER]
        rollout = dataclasses.replace(
            rollout, sglang=dataclasses.replace(rollout.sglang, extra_args=extra)
        )
    split = cpu_thread_split(cfg, cores)
    if split is not None:  # the user's own rollout.sglang.env wins
        env = {"OMP_NUM_THREADS": str(split[0]), **rollout.sglang.env}
        rollout = dataclasses.replace(rollout, sglang=dataclasses.replace(rollout.sglang, env=env))
    overrides = {k: getattr(cfg.model, k) for k in ("rope_theta", "max_position_embeddings")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides and cfg.model.hf_weights:
        extra = [*rollout.sglang.extra_args, "--json-model-override-args", json.dumps(overrides)]
        sglang = dataclasses.replace(rollout.sglang, extra_args=extra)
        rollout = dataclasses.replace(rollout, sglang=sglang)
    return rollout
