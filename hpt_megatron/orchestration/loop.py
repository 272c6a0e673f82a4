"""``hpt train``: the loop that sequences rollout -> batch rule -> update -> weight sync -> metrics.

    for step:  batch (driver) -> broadcast -> policy update (all ranks) -> sync -> log

Colocated placement generates each batch in line, after the previous step's weights were
loaded. Disaggregated placement generates in a background producer under the staleness bound
``run.max_staleness`` (``orchestration/rollouts.py``): the trainer's weights are queued for the
producer after each update, and the trainer waits only when the batch it needs is not ready.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hpt_megatron.config import HPTConfig, dump_yaml
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.data.tokenizer import load_tokenizer
from hpt_megatron.models.export import save_hf_folder
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.hf_io import write_config
from hpt_megatron.models.moe import RoutingReplay
from hpt_megatron.models.provider import (
    check_hf_supported,
    check_parallel_against_model,
    hf_config_with_overrides,
    load_hf_config,
)
from hpt_megatron.orchestration.driver import (
    Driver,
    build_cpu_engine,
    cpu_thread_split,
    data_parallel_generation,
    start_rollout_nodes,
)
from hpt_megatron.orchestration.faults import NonFiniteGuard, Preemption
from hpt_megatron.orchestration.metrics import MetricsLogger, derived_metrics
from hpt_megatron.orchestration.rollouts import (
    AsyncRollouts,
    InlineRollouts,
    ReplayRollouts,
    make_rollouts,
)
from hpt_megatron.orchestration.watchdog import Watchdog
from hpt_megatron.orchestration.weight_sync import disk_sync_for, sync_weights
from hpt_megatron.parallel.runtime import (
    ParallelContext,
    broadcast_from_driver,
    init_distributed,
    shutdown_distributed,
)
from hpt_megatron.rollout.replicas import serve_requests
from hpt_megatron.trainer.batching import microbatch_count_multiple, token_multiple
from hpt_megatron.trainer.build import build_policy, init_policy_weights
from hpt_megatron.trainer.checkpoint import Checkpointer, step_dir
from hpt_megatron.trainer.critic import Critic, CriticCheckpoint, build_critic, init_critic_weights
from hpt_megatron.trainer.engine import TrainEngine
from hpt_megatron.trainer.reference import ReferencePolicy
from hpt_megatron.trainer.update import PolicyUpdate, UpdateLayout

if TYPE_CHECKING:
    from hpt_megatron.rollout.cpu_engine import HFCpuEngine

_log = logging.getLogger(__name__)


def resolve_model_config(cfg: HPTConfig) -> HFModelConfig:
    """The HF config of the policy, with overrides; checked against the parallel layout."""
    hf = load_hf_config(cfg.model.hf_config or dict(cfg.model.inline))
    hf = hf_config_with_overrides(hf, cfg.model)
    check_hf_supported(hf)
    check_parallel_against_model(hf, cfg.parallel)
    return hf


@dataclass
class Run:
    """What every rank holds for a run (the driver's parts live in :class:`Driver`)."""

    cfg: HPTConfig
    ctx: ParallelContext
    run_dir: Path
    hf: HFModelConfig
    spec: AlgorithmSpec
    tokenizer: Any
    policy: TrainEngine
    update: PolicyUpdate
    checkpointer: Checkpointer
    reference: ReferencePolicy | None = None  # when a KL term is on
    critic: Critic | None = None  # for advantage gae


def train(cfg: HPTConfig) -> dict[str, float]:
    """Run (or resume) a training run; returns the last step's metrics on the driver."""
    hf = resolve_model_config(cfg)  # model-vs-parallel errors before any process group starts
    spec = cfg.algorithm.spec(max_staleness=cfg.run.max_staleness)
    ctx = init_distributed(
        cfg.parallel, seed=cfg.run.seed, timeout_s=cfg.fault.collective_timeout_s
    )
    split = cpu_thread_split(cfg)
    if split is not None and split[1] is not None:  # CPU servers generate while this rank trains
        torch.set_num_threads(split[1])
        _log.info("CPU threads: %d per SGLang server, %d per trainer rank", *split)
    driver = nodes = replica = None
    try:
        run = _build_run(cfg, ctx, hf, spec)
        # Over several nodes, each node's local rank 0 starts that node's SGLang servers.
        nodes = start_rollout_nodes(cfg, ctx, hf, run.tokenizer, run.run_dir)
        # A replay of recorded batches (run.replay_rollouts) has no driver and no engine.
        build = ctx.is_driver and not cfg.run.replay_rollouts
        driver = Driver.build(cfg, hf, run.tokenizer, run.run_dir, ctx, nodes) if build else None
        if not ctx.is_driver and data_parallel_generation(cfg, ctx.world_size):
            replica = build_cpu_engine(cfg, hf, run.tokenizer, data_parallel=True)
        return _train(run, driver, replica)
    finally:
        if driver is not None:
            driver.close()
        if replica is not None:
            replica.shutdown()
        if nodes is not None:
            nodes.close()
        shutdown_distributed()


def _build_run(cfg: HPTConfig, ctx: ParallelContext, hf: HFModelConfig, spec: AlgorithmSpec) -> Run:
    run_dir = Path(cfg.run.run_dir)
    if ctx.is_driver:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
    if ctx.world_size > 1:
        torch.distributed.barrier(group=ctx.cpu_group)
    tokenizer = load_tokenizer(cfg.model.tokenizer_source, run_dir)
    if len(tokenizer) > hf.vocab_size:
        raise ValueError(
            f"model vocab_size {hf.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )
    policy = build_policy(hf, cfg.model, cfg.parallel, cfg.trainer, ctx, total_steps=cfg.run.steps)
    routing_replay = spec.routing_replay == "rollout"
    if routing_replay:  # the routers take the experts the rollout engine chose
        policy.routing_replay = RoutingReplay.attach(policy.model_chunks, ctx.tp_rank, ctx.tp)
    reference = None
    if spec.needs_ref_logprobs:
        offload = cfg.algorithm.reference.offload
        reference = ReferencePolicy.build(hf, cfg.model, cfg.parallel, cfg.trainer, ctx, offload)
    critic = None
    if spec.advantage == "gae":
        critic_cfg = cfg.algorithm.critic
        engine = build_critic(
            hf,
            cfg.model,
            cfg.parallel,
            cfg.trainer,
            critic_cfg,
            ctx,
            total_steps=cfg.run.steps,
        )
        critic = Critic(engine, critic_cfg)
    layout = UpdateLayout(
        dp=ctx.dp,
        dp_rank=ctx.dp_rank,
        max_tokens=cfg.trainer.max_tokens_per_microbatch,
        pad_id=tokenizer.pad_token_id or 0,
        pad_to_multiple=token_multiple(ctx.tp, fp8=cfg.model.fp8 is not None),
        microbatch_multiple=microbatch_count_multiple(cfg.parallel.pp, cfg.parallel.vpp),
        packing=cfg.trainer.packing,
        elide_zero_rows=cfg.trainer.elide_zero_rows,
        mini_batches=cfg.trainer.mini_batches_per_step,
        epochs=cfg.trainer.epochs_per_step,
        equal_microbatch_counts=ctx.ep > 1,
        routing_replay=routing_replay,
    )

    def describe(path: Path) -> None:  # checkpoints are self-contained for hpt eval / convert
        write_config(hf, path)
        tokenizer.save_pretrained(str(path))

    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        ctx,
        save_every=cfg.checkpoint.save_every,
        keep_last=cfg.checkpoint.keep_last,
        last_step=cfg.run.steps,
        describe=describe,
        background=cfg.checkpoint.async_save,
    )
    update = PolicyUpdate(policy, layout, reference, critic)
    return Run(
        cfg, ctx, run_dir, hf, spec, tokenizer, policy, update, checkpointer, reference, critic
    )


def _train(run: Run, driver: Driver | None, replica: HFCpuEngine | None) -> dict[str, float]:
    """``replica``: this rank's CPU engine under data-parallel generation (not the driver's)."""
    cfg, ctx = run.cfg, run.ctx
    watchdog = Watchdog(cfg.fault, run.run_dir, ctx.rank, ctx.world_size).start()
    preemption = Preemption(cfg.fault.preempt_signals)
    try:
        return _train_steps(run, driver, replica, watchdog, preemption)
    finally:
        preemption.close()
        watchdog.stop()


def _from_driver(ctx: ParallelContext, obj: Any, replica: HFCpuEngine | None) -> Any:
    """The driver's ``obj`` on every rank; a rank holding a replica generates its share of the
    driver's requests while it waits (``rollout/replicas.py``)."""
    if replica is not None:
        return serve_requests(replica, ctx)
    return broadcast_from_driver(ctx, obj)


def _train_steps(
    run: Run,
    driver: Driver | None,
    replica: HFCpuEngine | None,
    watchdog: Watchdog,
    preemption: Preemption,
) -> dict[str, float]:
    cfg, ctx = run.cfg, run.ctx
    phase = watchdog.phase
    with phase("checkpoint"):
        state = run.checkpointer.resume(cfg.run.resume, run.policy)
    if state is None:
        init_policy_weights(run.policy, run.hf, cfg.model)
    elif driver is not None:
        driver.load_state_dict(state["sampler"])
    ckpt_root = run.run_dir / "checkpoints"
    critic_ckpt = None if run.critic is None else CriticCheckpoint(ckpt_root, run.critic.engine)
    if run.critic is not None and critic_ckpt is not None:
        if state is None:
            init_critic_weights(run.critic.engine, run.policy, run.critic.cfg)
        else:
            critic_ckpt.resume(step_dir(ckpt_root, int(state["step"])))
    if run.reference is not None:
        saved = run.run_dir / "reference"  # the initial random weights, when nothing else is named
        ref_cfg = cfg.algorithm.reference
        run.reference.load_weights(run.policy, run.hf, cfg.model, ref_cfg, saved, state is None)
    start = 0 if state is None else int(state["step"])
    logger = MetricsLogger(
        run.run_dir,
        enabled=ctx.is_driver,
        tensorboard=cfg.logging.tensorboard,
        jsonl=cfg.logging.jsonl,
        wandb_project=cfg.logging.wandb_project,
        total_steps=cfg.run.steps,
        progress_bar=cfg.logging.progress_bar,
        start_step=start,
    )
    engine = driver.engine if driver is not None else None
    syncing = not cfg.run.replay_rollouts  # a replay trains recorded batches: nothing to sync
    disk = disk_sync_for(cfg, run.tokenizer) if syncing else None  # None: to the driver's engine
    every_rank = data_parallel_generation(cfg, ctx.world_size)  # each rank has a replica
    chunks = run.policy.model_chunks
    if syncing:
        with phase("weight_sync", start):
            mine = engine if ctx.is_driver else replica
            sync_weights(mine, chunks, run.hf, ctx, start, disk=disk, every_rank=every_rank)
    colocated = cfg.run.placement == "colocated"
    rollouts: InlineRollouts | AsyncRollouts | ReplayRollouts
    if cfg.run.replay_rollouts:
        rollouts = ReplayRollouts(Path(cfg.run.replay_rollouts), ctx.is_driver)
    else:
        rollouts = make_rollouts(
            driver,
            run.spec,
            start,
            cfg.run.steps,
            cfg.run.placement,
            cfg.run.max_staleness,
            cfg.rollout.partial,
        )
    guard = NonFiniteGuard(cfg.fault.max_nonfinite_steps)
    run.policy.phase = phase
    metrics: dict[str, float] = {}
    preempted = False
    try:
        for step in range(start, cfg.run.steps):
            t_step = time.perf_counter()
            spec = run.spec.phase_for_step(step)
            with phase("checkpoint", step):
                run.checkpointer.poll()  # an asynchronous save whose files are all written
            with phase("rollout"):
                made = rollouts.batch(step, spec)  # the driver's; the others get None
            with phase("broadcast"):  # the other ranks wait here for the driver's rollout
                batch = _from_driver(ctx, made, replica)
            assert batch is not None
            if ctx.is_driver and cfg.logging.save_rollouts:
                (run.run_dir / "rollouts").mkdir(exist_ok=True)
                batch.save_jsonl(run.run_dir / "rollouts" / f"step_{step + 1:06d}.jsonl")
            if engine is not None and colocated:
                engine.release_memory()  # colocated: the trainer gets the devices
            with phase("forward_backward"):  # the engine marks its optimizer phase inside
                train_metrics = run.update.update(batch.samples, spec, step)
            if engine is not None and colocated:
                engine.resume_memory()
            guard.check(step + 1, train_metrics, run.checkpointer.last_complete)
            t_sync = time.perf_counter()
            with phase("weight_sync"):  # async: queued for the producer, not loaded here
                if syncing:
                    sink = rollouts.weight_sink if ctx.is_driver else replica
                    sync_weights(
                        sink, chunks, run.hf, ctx, step + 1, disk=disk, every_rank=every_rank
                    )
            metrics = {
                **batch.metrics,
                **train_metrics,
                "time/weight_sync_s": time.perf_counter() - t_sync,
            }
            if cfg.run.val_every and (step + 1) % cfg.run.val_every == 0:
                # Every rank needs the score: it decides whether all of them save "best".
                with phase("validation"):
                    metrics.update(_from_driver(ctx, rollouts.validate(), replica))
            # Every rank stops after the same step when any of them was signalled.
            preempted = preemption.agreed(ctx)
            t_ckpt = time.perf_counter()
            with phase("checkpoint"):
                run.checkpointer.poll()
                # The data position before the next batch was drawn (batches generated ahead
                # are drawn again by a resumed run).
                data = rollouts.next_sampler_state(step)
                score = metrics.get("val/accuracy")
                due = preempted or run.checkpointer.due(step + 1, score)
                if critic_ckpt is not None and due:
                    critic_ckpt.save(step_dir(ckpt_root, step + 1))  # before the policy's
                did_save = run.checkpointer.maybe_save(
                    step + 1, run.policy, score, {"sampler": data}, force=preempted
                )
                if did_save and critic_ckpt is not None and ctx.is_driver:
                    critic_ckpt.prune()
            # (plus the time this step's update waited for the previous save's snapshot)
            blocked = time.perf_counter() - t_ckpt + run.checkpointer.take_staging_wait()
            metrics["time/checkpoint_blocked_s"] = blocked
            metrics["time/step_s"] = time.perf_counter() - t_step
            metrics.update(derived_metrics(metrics))
            logger.log(step + 1, metrics)
            for key, values in batch.histograms.items():
                logger.histogram(step + 1, key, values)
            if preempted:
                if ctx.is_driver:
                    print(
                        f"hpt: stopped by {preemption.requested or 'a signal to another rank'} "
                        f"after step {step + 1}; checkpoint {run.checkpointer.last_complete}; "
                        "run again with run.resume=auto to continue",
                        flush=True,
                    )
                break
        with phase("checkpoint"):
            run.checkpointer.wait()  # an asynchronous save still being written
    finally:
        rollouts.close()
        logger.close()
    if cfg.checkpoint.export_hf and not preempted:
        _export_final(run)
    return metrics


def _export_final(run: Run) -> Path:
    """Collective: the final policy as an HF folder ``<run_dir>/hf`` (config, shards, tokenizer)."""
    out = run.run_dir / "hf"
    modules = [getattr(c, "module", c) for c in run.policy.model_chunks]
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    save_hf_folder(modules, run.hf, out, run.ctx, torch_dtype=dtype[modules[0].config.params_dtype])
    if run.ctx.is_driver:
        run.tokenizer.save_pretrained(str(out))
    if run.critic is not None:  # the value model beside it, for AutoModelForTokenClassification
        from hpt_megatron.models.value import save_value_hf_folder

        critic = [getattr(c, "module", c) for c in run.critic.engine.model_chunks]
        dtype_name = dtype[critic[0].config.params_dtype]
        save_value_hf_folder(
            critic, run.hf, run.run_dir / "hf_critic", run.ctx, torch_dtype=dtype_name
        )
        if run.ctx.is_driver:
            run.tokenizer.save_pretrained(str(run.run_dir / "hf_critic"))
    return out
