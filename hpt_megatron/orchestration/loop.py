"""``hpt train``: the loop, a short sequence of named calls per step.

    rollout (driver) -> broadcast -> update -> push weights -> validation -> save -> metrics

The trainer side (models, optimizers, update, checkpoints) is ``trainer/run.Trainer``; the
rollouts ``orchestration/rollouts.py`` (the driver's generation and batch rule); the weight push
``rollout/weight_sync/`` (one pusher, chosen once by the rollout plan, ``rollout/plan.py``).
Validation comes after the push (it scores the new weights) and before the save (a new best
score is saved as ``best``).

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
from typing import TYPE_CHECKING, Any, Protocol

import torch

from hpt_megatron.config import HPTConfig
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.disk import writing
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.provider import (
    check_hf_supported,
    check_parallel_against_model,
    hf_config_with_overrides,
    load_hf_config,
)
from hpt_megatron.orchestration.driver import Driver
from hpt_megatron.orchestration.faults import NonFiniteGuard, Preemption
from hpt_megatron.orchestration.metrics import MetricsLogger, derived_metrics
from hpt_megatron.orchestration.rollouts import ReplayRollouts, make_rollouts
from hpt_megatron.orchestration.run_dir import check_run_dir, prepare_run_dir
from hpt_megatron.orchestration.watchdog import Watchdog
from hpt_megatron.parallel.runtime import (
    ParallelContext,
    broadcast_from_driver,
    init_distributed,
    shutdown_distributed,
)
from hpt_megatron.rollout.factory import build_replica, start_rollout_nodes
from hpt_megatron.rollout.plan import MEMORY_SAVER, adds_memory_saver, rollout_plan
from hpt_megatron.rollout.replicas import serve_requests
from hpt_megatron.rollout.weight_sync import WeightPusher, build_weight_pusher
from hpt_megatron.trainer.engine import PhaseMarker
from hpt_megatron.trainer.run import Trainer

if TYPE_CHECKING:
    from hpt_megatron.data.sample import Sample
    from hpt_megatron.orchestration.rollouts import RolloutBatch
    from hpt_megatron.rollout.cpu_engine import HFCpuEngine

_log = logging.getLogger(__name__)


def resolve_model_config(cfg: HPTConfig) -> HFModelConfig:
    """The HF config of the policy, with overrides; checked against the parallel layout."""
    hf = load_hf_config(cfg.model.hf_config or dict(cfg.model.inline))
    hf = hf_config_with_overrides(hf, cfg.model)
    check_hf_supported(hf)
    check_parallel_against_model(hf, cfg.parallel)
    return hf


def train(cfg: HPTConfig) -> dict[str, float]:
    """Run (or resume) a training run; returns the last step's metrics on the driver."""
    hf = resolve_model_config(cfg)  # model-vs-parallel errors before any process group starts
    run_dir = Path(cfg.run.run_dir)
    check_run_dir(run_dir, hf)  # another run's folder: an error before anything is written
    spec = cfg.algorithm.spec(max_staleness=cfg.run.max_staleness)
    ctx = init_distributed(
        cfg.parallel, seed=cfg.run.seed, timeout_s=cfg.fault.collective_timeout_s
    )
    plan = rollout_plan(cfg, ctx.world_size)
    if ctx.is_driver and plan.transport is not None:
        _log.info("weight sync: %s (%s)", plan.transport, plan.transport_reason)
    if ctx.is_driver and adds_memory_saver(cfg):
        _log.info(
            "SGLang servers: %s added: colocated GPU servers release their memory while the "
            "trainer runs, which does nothing without it",
            MEMORY_SAVER,
        )
    threads = plan.threads
    if threads.trainer is not None:  # CPU servers generate while this rank trains
        torch.set_num_threads(threads.trainer)
        _log.info(
            "CPU threads: %d per SGLang server, %d per trainer rank",
            threads.server,
            threads.trainer,
        )
    watchdog = Watchdog(cfg.fault, run_dir, ctx.rank, ctx.world_size)
    driver = nodes = replica = None
    try:
        tokenizer = prepare_run_dir(cfg, ctx, hf, run_dir)
        trainer = Trainer.build(cfg, ctx, hf, spec, tokenizer, phase=watchdog.phase)
        # Over several nodes, each node's local rank 0 starts that node's SGLang servers.
        nodes = start_rollout_nodes(plan, cfg, ctx, hf, tokenizer, run_dir)
        # A replay of recorded batches (run.replay_rollouts) has no driver and no engine.
        build = ctx.is_driver and plan.engine is not None
        driver = Driver.build(cfg, plan, hf, tokenizer, run_dir, ctx, nodes) if build else None
        replica = build_replica(plan, cfg, hf, tokenizer, ctx)
        weights = build_weight_pusher(plan, trainer.chunks, hf, ctx, tokenizer)
        pusher = WeightPush(weights, ctx, replica, watchdog.phase)
        watchdog.start()
        preemption = Preemption(cfg.fault.preempt_signals)
        try:
            return _train(cfg, ctx, spec, trainer, driver, pusher, watchdog.phase, preemption)
        finally:
            preemption.close()
            watchdog.stop()
            if weights is not None:
                weights.close()  # its process groups, before the engine stops the servers
    finally:
        if driver is not None:
            driver.close()
        if replica is not None:
            replica.shutdown()
        if nodes is not None:
            nodes.close()
        shutdown_distributed()


def _train(
    cfg: HPTConfig,
    ctx: ParallelContext,
    spec: AlgorithmSpec,
    trainer: Trainer,
    driver: Driver | None,
    pusher: WeightPush,
    phase: PhaseMarker,
    preemption: Preemption,
) -> dict[str, float]:
    """Resume, push the starting weights, then the steps."""
    resumed = trainer.resume()
    start = 0 if resumed is None else resumed.step
    if resumed is not None and driver is not None:
        driver.load_state_dict(resumed.sampler)
    logger = MetricsLogger(
        Path(cfg.run.run_dir),
        enabled=ctx.is_driver,
        tensorboard=cfg.logging.tensorboard,
        jsonl=cfg.logging.jsonl,
        wandb_project=cfg.logging.wandb_project,
        total_steps=cfg.run.steps,
        progress_bar=cfg.logging.progress_bar,
        start_step=start,
    )
    engine = driver.engine if driver is not None else None
    pusher.start(engine, start)
    rollouts: Rollouts
    if cfg.run.replay_rollouts:
        rollouts = ReplayRollouts(Path(cfg.run.replay_rollouts), ctx.is_driver)
    else:
        rollouts = make_rollouts(
            driver,
            spec,
            start,
            cfg.run.steps,
            cfg.run.placement,
            cfg.run.max_staleness,
            cfg.rollout.partial,
        )
    colocated = engine if cfg.run.placement == "colocated" else None
    replica = pusher.replica
    parts = LoopParts(trainer, rollouts, pusher, logger, preemption, phase, replica, colocated)
    failed = True
    try:
        metrics, preempted = StepLoop(cfg, ctx, spec, parts).run(start)
        trainer.finish()
        failed = False
    finally:
        if failed:
            trainer.abandon()  # a save still being written: its partial folder removed
        rollouts.close()
        logger.close(quiet=failed)  # a failed run's own error stays the one reported
    if cfg.checkpoint.export_hf and not preempted:
        trainer.export()
    return metrics


def record_batch(batch: RolloutBatch, folder: Path, step: int) -> Path:
    """``logging.save_rollouts``: the batch of ``step`` (1-based) as
    ``folder/step_NNNNNN.jsonl``; a file that cannot be written whole is removed
    (a :class:`~hpt_megatron.disk.WriteError`)."""
    path = folder / f"step_{step:06d}.jsonl"
    with writing(path, "recorded rollouts", partial=path):
        folder.mkdir(exist_ok=True)
        batch.save_jsonl(path)
    return path


class WeightPush:
    """The policy's weights to the rollout engines through the run's pusher
    (``rollout/weight_sync/``): once before the first step, then after every update; nothing
    when replaying recorded batches (no pusher)."""

    def __init__(
        self,
        pusher: WeightPusher | None,
        ctx: ParallelContext,
        replica: HFCpuEngine | None,
        phase: PhaseMarker,
    ) -> None:
        self.pusher = pusher
        self.ctx = ctx
        self.replica = replica  # this rank's engine under data-parallel generation
        self.phase = phase

    def start(self, engine: Any, start: int) -> None:
        """The starting weights (version ``start``) to the driver's engine and the replicas."""
        if self.pusher is not None:
            with self.phase("weight_sync", start):
                self.pusher.push(start, engine if self.ctx.is_driver else self.replica)

    def push(self, rollouts: Rollouts, version: int) -> None:
        """The weights after an update, to ``rollouts.weight_sink`` (colocated: the engine;
        disaggregated: queued for the producer, not loaded here) and the replicas."""
        with self.phase("weight_sync"):
            if self.pusher is not None:
                sink = rollouts.weight_sink if self.ctx.is_driver else self.replica
                self.pusher.push(version, sink)


class Rollouts(Protocol):
    """Where each step's batch comes from (``orchestration/rollouts.py``)."""

    @property
    def weight_sink(self) -> Any: ...

    def batch(self, step: int, spec: AlgorithmSpec) -> RolloutBatch | None: ...

    def validate(self) -> dict[str, float]: ...

    def next_sampler_state(self, step: int) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class TrainerSteps(Protocol):
    """What the steps call on the trainer side (``trainer/run.Trainer``)."""

    @property
    def last_complete(self) -> Path | None: ...

    def step(self, samples: list[Sample], spec: AlgorithmSpec, step: int) -> dict[str, float]: ...

    def poll(self) -> None: ...

    def save(
        self, step: int, score: float | None, sampler: dict[str, Any] | None, force: bool
    ) -> bool: ...

    def take_staging_wait(self) -> float: ...


class Pusher(Protocol):
    def push(self, rollouts: Rollouts, version: int) -> None: ...


class Logger(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def histogram(self, step: int, key: str, values: list[float]) -> None: ...


@dataclass
class LoopParts:
    """What the steps call: the trainer side, the batch source, the weight push, the metrics
    logger, the preemption signal, the watchdog's phase marker; ``replica``: this rank's engine
    under data-parallel generation; ``colocated_engine``: the driver's engine, which gives the
    devices up during the update."""

    trainer: TrainerSteps
    rollouts: Rollouts
    pusher: Pusher
    logger: Logger
    preemption: Preemption
    phase: PhaseMarker
    replica: HFCpuEngine | None = None
    colocated_engine: Any = None


class StepLoop:
    """One rank's steps, each a sequence of named calls (every rank runs them together)."""

    def __init__(
        self, cfg: HPTConfig, ctx: ParallelContext, spec: AlgorithmSpec, parts: LoopParts
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.spec = spec
        self.parts = parts
        self.trainer = parts.trainer
        self.rollouts = parts.rollouts
        self.phase = parts.phase
        self.guard = NonFiniteGuard(cfg.fault.max_nonfinite_steps)

    def run(self, start: int) -> tuple[dict[str, float], bool]:
        """The steps from ``start``; the last step's metrics and whether a signal stopped it."""
        metrics: dict[str, float] = {}
        for step in range(start, self.cfg.run.steps):
            metrics, preempted = self.step(step)
            if preempted:
                self._say_stopped(step)
                return metrics, True
        return metrics, False

    def step(self, step: int) -> tuple[dict[str, float], bool]:
        """Step ``step`` (0-based); its metrics and whether every rank stops after it."""
        t_step = time.perf_counter()
        spec = self.spec.phase_for_step(step)
        with self.phase("checkpoint", step):
            self.trainer.poll()  # an asynchronous save whose files are all written
        batch = self._rollout(step, spec)
        train_metrics = self._update(batch.samples, spec, step)
        t_sync = time.perf_counter()
        self.parts.pusher.push(self.rollouts, step + 1)
        metrics = {
            **batch.metrics,
            **train_metrics,
            "time/weight_sync_s": time.perf_counter() - t_sync,
        }
        metrics.update(self._validate(step))
        # Every rank stops after the same step when any of them was signalled.
        preempted = self.parts.preemption.agreed(self.ctx)
        metrics["time/checkpoint_blocked_s"] = self._save(step, metrics, preempted)
        metrics["time/step_s"] = time.perf_counter() - t_step
        metrics.update(derived_metrics(metrics))
        self.parts.logger.log(step + 1, metrics)
        for key, values in batch.histograms.items():
            self.parts.logger.histogram(step + 1, key, values)
        return metrics, preempted

    def _say_stopped(self, step: int) -> None:
        if self.ctx.is_driver:
            signal = self.parts.preemption.requested or "a signal to another rank"
            print(
                f"hpt: stopped by {signal} after step {step + 1}; checkpoint "
                f"{self.trainer.last_complete}; run again with run.resume=auto to continue",
                flush=True,
            )

    def _from_driver(self, obj: Any) -> Any:
        """The driver's ``obj`` on every rank; a rank holding a replica generates its share of
        the driver's requests while it waits (``rollout/replicas.py``)."""
        if self.parts.replica is not None:
            return serve_requests(self.parts.replica, self.ctx)
        return broadcast_from_driver(self.ctx, obj)

    def _rollout(self, step: int, spec: AlgorithmSpec) -> RolloutBatch:
        """The driver's batch of ``step`` (generated, rewarded, the batch rule applied), on
        every rank."""
        with self.phase("rollout"):
            made = self.rollouts.batch(step, spec)  # the driver's; the others get None
        with self.phase("broadcast"):  # the other ranks wait here for the driver's rollout
            batch = self._from_driver(made)
        assert batch is not None
        if self.ctx.is_driver and self.cfg.logging.save_rollouts:
            record_batch(batch, Path(self.cfg.run.run_dir) / "rollouts", step + 1)
        return batch

    def _update(self, samples: list[Sample], spec: AlgorithmSpec, step: int) -> dict[str, float]:
        engine = self.parts.colocated_engine
        if engine is not None:
            engine.release_memory()  # colocated: the trainer gets the devices
        with self.phase("forward_backward"):  # the engine marks its optimizer phase inside
            metrics = self.trainer.step(samples, spec, step)
        if engine is not None:
            engine.resume_memory()
        self.guard.check(step + 1, metrics, self.trainer.last_complete)
        return metrics

    def _validate(self, step: int) -> dict[str, float]:
        every = self.cfg.run.val_every
        if not every or (step + 1) % every:
            return {}
        # Every rank needs the score: it decides whether all of them save "best".
        with self.phase("validation"):
            return self._from_driver(self.rollouts.validate())

    def _save(self, step: int, metrics: dict[str, float], preempted: bool) -> float:
        """Save when due; the seconds the step was blocked by checkpointing (with the time the
        update waited for the previous save's snapshot)."""
        t0 = time.perf_counter()
        with self.phase("checkpoint"):
            self.trainer.poll()
            # The data position before the next batch was drawn (batches generated ahead are
            # drawn again by a resumed run).
            data = self.rollouts.next_sampler_state(step)
            self.trainer.save(step + 1, metrics.get("val/accuracy"), data, force=preempted)
        return time.perf_counter() - t0 + self.trainer.take_staging_wait()
