"""``hpt train``: the loop that sequences rollout -> batch rule -> update -> weight sync -> metrics.

    for step:  driver.rollout (rank 0) -> broadcast -> policy update (all ranks) -> sync -> log

Colocated placement runs the halves in turn. Disaggregated placement with ``max_staleness: 1``
generates step t+1 in a background thread while step t trains (one step off-policy): the batch of
step t+1 comes from the weights after step t-1, and the weights of step t are loaded only after
that generation has finished, so the engine never changes weights mid-generation.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpt_megatron.algorithms import AlgorithmSpec
from hpt_megatron.config import HPTConfig, dump_yaml
from hpt_megatron.data.sample import RolloutBatch
from hpt_megatron.data.tokenizer import load_tokenizer
from hpt_megatron.models.export import save_hf_folder
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.hf_io import write_config
from hpt_megatron.models.provider import (
    check_hf_supported,
    check_parallel_against_model,
    hf_config_with_overrides,
    load_hf_config,
)
from hpt_megatron.orchestration.driver import Driver
from hpt_megatron.orchestration.metrics import MetricsLogger, derived_metrics
from hpt_megatron.orchestration.weight_sync import sync_weights
from hpt_megatron.parallel.runtime import (
    ParallelContext,
    broadcast_from_driver,
    init_distributed,
    shutdown_distributed,
)
from hpt_megatron.trainer.batching import microbatch_count_multiple, token_multiple
from hpt_megatron.trainer.build import build_policy, init_policy_weights
from hpt_megatron.trainer.checkpoint import Checkpointer
from hpt_megatron.trainer.engine import TrainEngine
from hpt_megatron.trainer.update import PolicyUpdate, UpdateLayout


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


def train(cfg: HPTConfig) -> dict[str, float]:
    """Run (or resume) a training run; returns the last step's metrics on the driver."""
    hf = resolve_model_config(cfg)  # model-vs-parallel errors before any process group starts
    spec = cfg.algorithm.spec()
    ctx = init_distributed(cfg.parallel, seed=cfg.run.seed)
    driver = None
    try:
        run = _build_run(cfg, ctx, hf, spec)
        driver = Driver.build(cfg, hf, run.tokenizer, run.run_dir) if ctx.is_driver else None
        return _train(run, driver)
    finally:
        if driver is not None:
            driver.close()
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
    layout = UpdateLayout(
        dp=ctx.dp,
        dp_rank=ctx.dp_rank,
        max_tokens=cfg.trainer.max_tokens_per_microbatch,
        pad_id=tokenizer.pad_token_id or 0,
        pad_to_multiple=token_multiple(ctx.tp, fp8=cfg.model.fp8 is not None),
        microbatch_multiple=microbatch_count_multiple(cfg.parallel.pp, cfg.parallel.vpp),
        packing=cfg.trainer.packing,
        mini_batches=cfg.trainer.mini_batches_per_step,
        epochs=cfg.trainer.epochs_per_step,
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
    )
    return Run(
        cfg, ctx, run_dir, hf, spec, tokenizer, policy, PolicyUpdate(policy, layout), checkpointer
    )


def _train(run: Run, driver: Driver | None) -> dict[str, float]:
    cfg, ctx = run.cfg, run.ctx
    state = run.checkpointer.resume(cfg.run.resume, run.policy)
    if state is None:
        init_policy_weights(run.policy, run.hf, cfg.model)
    elif driver is not None:
        driver.load_state_dict(state["sampler"])
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
    sync_weights(engine, run.policy.model_chunks, run.hf, ctx, version=start)
    overlap = cfg.run.placement == "disaggregated" and cfg.run.max_staleness == 1
    rollouts = _Rollouts(driver, run.spec, cfg.run.steps, overlap)
    metrics: dict[str, float] = {}
    try:
        for step in range(start, cfg.run.steps):
            t_step = time.perf_counter()
            batch = broadcast_from_driver(ctx, rollouts.batch(step))
            assert batch is not None
            if ctx.is_driver and cfg.logging.save_rollouts:
                (run.run_dir / "rollouts").mkdir(exist_ok=True)
                batch.save_jsonl(run.run_dir / "rollouts" / f"step_{step + 1:06d}.jsonl")
            if engine is not None and not overlap:
                engine.release_memory()  # colocated: the trainer gets the devices
            train_metrics = run.update.update(batch.samples, run.spec.phase_for_step(step))
            if engine is not None and not overlap:
                engine.resume_memory()
            wait_s = rollouts.finish_pending()  # step t+1's generation ends before reloading
            t_sync = time.perf_counter()
            sync_weights(engine, run.policy.model_chunks, run.hf, ctx, version=step + 1)
            metrics = {
                **batch.metrics,
                **train_metrics,
                "time/weight_sync_s": time.perf_counter() - t_sync,
                "time/rollout_wait_s": batch.metrics.get("time/rollout_wait_s", 0.0) + wait_s,
                "rollout/staleness": float(overlap),
            }
            if cfg.run.val_every and (step + 1) % cfg.run.val_every == 0:
                # Every rank needs the score: it decides whether all of them save "best".
                val = driver.validate() if driver is not None else {}
                metrics.update(broadcast_from_driver(ctx, val))
            metrics["time/step_s"] = time.perf_counter() - t_step
            metrics.update(derived_metrics(metrics))
            logger.log(step + 1, metrics)
            for key, values in batch.histograms.items():
                logger.histogram(step + 1, key, values)
            # The data position of the next batch when it was already drawn (one-step-off
            # generation), so a resumed run draws that batch again.
            data = rollouts.next_sampler_state() if driver is not None else None
            run.checkpointer.maybe_save(
                step + 1, run.policy, metrics.get("val/accuracy"), {"sampler": data}
            )
    finally:
        rollouts.close()
        logger.close()
    if cfg.checkpoint.export_hf:
        _export_final(run)
    return metrics


class _Rollouts:
    """The driver's batches in step order; with ``overlap``, step t+1 is generated in a thread
    while step t trains. Other ranks get None."""

    def __init__(self, driver: Driver | None, spec: AlgorithmSpec, steps: int, overlap: bool):
        self.driver = driver
        self.spec = spec
        self.steps = steps
        self.executor = ThreadPoolExecutor(1) if overlap and driver is not None else None
        self.pending: Future[RolloutBatch] | None = None

    def _make(self, step: int) -> RolloutBatch:
        assert self.driver is not None
        return self.driver.rollout(step, self.spec.phase_for_step(step))

    def batch(self, step: int) -> RolloutBatch | None:
        if self.driver is None:
            return None
        t0 = time.perf_counter()
        batch = self.pending.result() if self.pending is not None else self._make(step)
        batch.metrics["time/rollout_wait_s"] = time.perf_counter() - t0
        self.pending = None
        if self.executor is not None and step + 1 < self.steps:
            self.pending = self.executor.submit(self._make, step + 1)
        return batch

    def finish_pending(self) -> float:
        """Wait for the background generation of the next step; seconds waited."""
        if self.pending is None:
            return 0.0
        t0 = time.perf_counter()
        self.pending.result()
        return time.perf_counter() - t0

    def next_sampler_state(self) -> dict[str, Any]:
        assert self.driver is not None
        if self.pending is not None:
            return self.pending.result().sampler_state or {}
        return self.driver.state_dict()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _export_final(run: Run) -> Path:
    """Collective: the final policy as an HF folder ``<run_dir>/hf`` (config, shards, tokenizer)."""
    out = run.run_dir / "hf"
    modules = [getattr(c, "module", c) for c in run.policy.model_chunks]
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    save_hf_folder(modules, run.hf, out, run.ctx, torch_dtype=dtype[modules[0].config.params_dtype])
    if run.ctx.is_driver:
        run.tokenizer.save_pretrained(str(out))
    return out
