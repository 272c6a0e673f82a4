"""``hpt train``: the loop that interleaves generation and training.

    for step:  rollouts (driver) -> batch rule -> broadcast -> train -> weight sync -> metrics

Colocated placement runs the halves in turn. Disaggregated placement with ``max_staleness: 1``
generates step t+1 in a background thread while step t trains (one step off-policy): the batch of
step t+1 comes from the weights after step t-1, and the weights of step t are loaded only after
that generation has finished, so the engine never changes weights mid-generation.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from hpt_megatron.config import HPTConfig
from hpt_megatron.orchestration.components import (
    Run,
    build_run,
    init_policy_weights,
    resolve_model_config,
)
from hpt_megatron.orchestration.metrics import MetricsLogger
from hpt_megatron.orchestration.state import choose_resume, rng_state, set_rng_state
from hpt_megatron.orchestration.step import (
    StepBatch,
    rollout_phase,
    train_phase,
)
from hpt_megatron.orchestration.validate import export_final, save_run_checkpoint, validate
from hpt_megatron.orchestration.weight_sync import sync_weights
from hpt_megatron.parallel.runtime import (
    broadcast_from_driver,
    init_distributed,
    shutdown_distributed,
)
from hpt_megatron.trainer.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def train(cfg: HPTConfig) -> dict[str, float]:
    """Run (or resume) a training run; returns the last step's metrics on the driver."""
    resolve_model_config(cfg)  # model-vs-parallel errors before any process group starts
    ctx = init_distributed(cfg.parallel, seed=cfg.run.seed)
    run = build_run(cfg, ctx)
    try:
        return _train(run)
    finally:
        if run.pool is not None:
            run.pool.close()
        if run.engine is not None:
            run.engine.shutdown()
        shutdown_distributed()


def _resume(run: Run) -> tuple[int, float]:
    """Load the checkpoint chosen on the driver; returns (first step to run, best val metric)."""
    root = run.run_dir / "checkpoints"
    path = choose_resume(root, run.cfg.run.resume) if run.ctx.is_driver else None
    path = broadcast_from_driver(run.ctx, path)
    if path is None:
        init_policy_weights(run)
        return 0, float("-inf")
    state = load_checkpoint(path, run.trainer.model_chunks, run.trainer.optimizer)
    run.trainer.scheduler.load_state_dict(state["scheduler"])
    if run.sampler is not None:
        run.sampler.load_state_dict(state["sampler"])
    set_rng_state(state.get("rng", {}))
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), float(state.get("best_val", float("-inf")))


def _train(run: Run) -> dict[str, float]:
    cfg, ctx = run.cfg, run.ctx
    start, best_val = _resume(run)
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
    sync_weights(run.engine, run.trainer.model_chunks, run.hf, ctx, version=start)
    overlap = cfg.run.placement == "disaggregated" and cfg.run.max_staleness == 1
    executor = ThreadPoolExecutor(1) if overlap and ctx.is_driver else None
    pending: Future | None = None
    metrics: dict[str, float] = {}
    try:
        for step in range(start, cfg.run.steps):
            t_step = time.perf_counter()
            batch, wait_s, pending = _next_batch(run, step, executor, pending)
            batch = broadcast_from_driver(ctx, batch)
            if not overlap and run.engine is not None:
                run.engine.release_memory()  # colocated: the trainer gets the devices
            train_metrics = train_phase(run, batch)
            if not overlap and run.engine is not None:
                run.engine.resume_memory()
            if pending is not None:  # the engine finishes step t+1's generation before reloading
                pending_wait = time.perf_counter()
                pending.result()
                wait_s += time.perf_counter() - pending_wait
            t_sync = time.perf_counter()
            sync_weights(run.engine, run.trainer.model_chunks, run.hf, ctx, version=step + 1)
            metrics = {
                **batch.metrics,
                **train_metrics,
                "time/weight_sync_s": time.perf_counter() - t_sync,
                "time/rollout_wait_s": wait_s,
                "rollout/staleness": float(overlap),
            }
            if cfg.run.val_every and (step + 1) % cfg.run.val_every == 0:
                # Every rank needs the score: it decides whether all of them save "best".
                metrics.update(broadcast_from_driver(ctx, validate(run, step + 1)))
            metrics["time/step_s"] = time.perf_counter() - t_step
            _derived(metrics)
            logger.log(step + 1, metrics)
            for key, values in batch.histograms.items():
                logger.histogram(step + 1, key, values)
            next_data = pending.result().sampler_state if pending is not None else None
            best_val = _maybe_checkpoint(run, step + 1, metrics, best_val, next_data)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        logger.close()
    export_final(run)
    return metrics


def _next_batch(
    run: Run, step: int, executor: ThreadPoolExecutor | None, pending: Future | None
) -> tuple[StepBatch | None, float, Future | None]:
    """The driver's batch for ``step`` (and, when overlapping, the future of step + 1)."""
    if not run.ctx.is_driver:
        return None, 0.0, None
    t0 = time.perf_counter()
    if executor is None:
        return rollout_phase(run, step), time.perf_counter() - t0, None
    batch = pending.result() if pending is not None else rollout_phase(run, step)
    wait = time.perf_counter() - t0
    nxt = executor.submit(rollout_phase, run, step + 1) if step + 1 < run.cfg.run.steps else None
    return batch, wait, nxt


def _derived(metrics: dict[str, float]) -> None:
    """Means from summed shares, throughput and the scheduler's own overhead."""
    tokens = metrics.get("train/tokens", 0.0)
    step_s = metrics["time/step_s"]
    metrics["throughput/tokens_per_s"] = tokens / step_s if step_s else 0.0
    work = sum(
        metrics.get(k, 0.0)
        for k in (
            "time/generation_s",
            "time/grading_s",
            "time/logprob_s",
            "time/train_s",
            "time/weight_sync_s",
            "time/validation_s",
        )
    )
    metrics["time/overhead_share"] = max(0.0, step_s - work) / step_s if step_s else 0.0


def _maybe_checkpoint(
    run: Run, step: int, metrics: dict[str, float], best_val: float, next_data: dict | None
) -> float:
    """Save every ``save_every`` steps, at the end and on a new best validation score.

    ``next_data`` is the data position of the next step's batch when it was already drawn
    (one-step-off generation), so a resumed run draws that batch again.
    """
    cfg = run.cfg
    every = cfg.checkpoint.save_every
    val = metrics.get("val/accuracy")
    is_best = val is not None and val > best_val
    best_val = val if is_best else best_val
    if (every and step % every == 0) or step == cfg.run.steps or is_best:
        state = {
            "step": step,
            "best_val": best_val,
            "rng": rng_state(),
            "scheduler": run.trainer.scheduler.state_dict(),
            "sampler": next_data or (run.sampler.state_dict() if run.sampler else None),
        }
        save_run_checkpoint(run, step, state, is_best=is_best)
    return best_val
