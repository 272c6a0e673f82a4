"""One step, in two halves: the driver's rollout phase and every rank's training phase."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hpt_megatron.algorithms import AlgorithmSpec
from hpt_megatron.data.sample import Sample
from hpt_megatron.orchestration.batch_rules import (
    apply_batch_rule,
    attach_advantages,
    demo_sample,
    shape_overlong,
)
from hpt_megatron.orchestration.components import Run
from hpt_megatron.orchestration.rollout_step import generate_samples, grade_samples
from hpt_megatron.orchestration.train_batch import (
    PolicyLossFn,
    attach_old_logprobs,
    build_microbatches,
    global_totals,
)
from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.factory import sampling_params

MAX_REFILL_ROUNDS = 4  # DAPO dynamic sampling: extra prompt batches drawn to refill a step


@dataclass
class StepBatch:
    """What the driver hands to every rank for one step."""

    step: int
    samples: list[Sample]
    advantages: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, list[float]] = field(default_factory=dict)
    sampler_state: dict | None = None  # the data position before this batch was drawn


def step_sampling_params(run: Run, step: int) -> SamplingParams:
    """The rollout section's sampling, seeded per step (a resumed run draws the same samples)."""
    return sampling_params(
        run.cfg.rollout,
        seed=run.cfg.run.seed * 100_003 + step,
        max_new_tokens=min(run.cfg.rollout.max_new_tokens, run.cfg.data.max_response_tokens),
        stop_token_ids=[run.tokenizer.eos_token_id],
    )


def rollout_phase(run: Run, step: int) -> StepBatch:
    """Driver only: prompts -> rollouts -> rewards -> the preset's batch rule -> advantages."""
    assert run.sampler is not None and run.engine is not None and run.pool is not None
    spec = run.spec.phase_for_step(step)
    timings = {"time/generation_s": 0.0, "time/grading_s": 0.0}
    sampler_state = run.sampler.state_dict()
    prompts = run.sampler.next_batch()
    if spec.advantage == "one":  # SFT: train on the demonstrations, nothing to generate
        samples = [demo_sample(p, g, sft_weight=0.0, rl_weight=1.0) for g, p in enumerate(prompts)]
        batch = _finish(spec, step, samples, {"sft/rows": float(len(samples))}, timings, [])
        batch.sampler_state = sampler_state
        return batch
    params = step_sampling_params(run, step)
    plan_samples: list[Sample] = []
    metrics: dict[str, float] = {}
    rollouts_all: list[Sample] = []
    for round_ in range(MAX_REFILL_ROUNDS + 1):
        t0 = time.perf_counter()
        rollouts = generate_samples(run.engine, prompts, params, run.tokenizer)
        t1 = time.perf_counter()
        grade_samples(run.pool, rollouts, run.cfg.reward)
        timings["time/generation_s"] += t1 - t0
        timings["time/grading_s"] += time.perf_counter() - t1
        offset = len(rollouts_all) // max(1, params.n)
        for s in rollouts:
            s.group_id += offset
        rollouts_all += rollouts
        shape_overlong(spec, rollouts, params.max_new_tokens)
        plan = apply_batch_rule(spec, prompts, rollouts)
        plan_samples += plan.samples
        metrics.update(plan.metrics)
        target = run.cfg.data.prompts_per_step * params.n
        if (
            spec.batch_rule != "dynamic_sampling"
            or len(plan_samples) >= target
            or round_ == MAX_REFILL_ROUNDS
        ):
            break
        prompts = run.sampler.next_batch()  # DAPO: refill with fresh prompts
    metrics.update(_rollout_metrics(rollouts_all, params.max_new_tokens))
    batch = _finish(spec, step, plan_samples, metrics, timings, rollouts_all)
    batch.sampler_state = sampler_state
    return batch


def _finish(
    spec: AlgorithmSpec,
    step: int,
    samples: list[Sample],
    metrics: dict,
    timings: dict,
    rollouts: list[Sample],
) -> StepBatch:
    advantages = attach_advantages(spec, samples).tolist() if samples else []
    histograms = {}
    if rollouts:
        histograms["reward/per_prompt_success"] = _success_rates(rollouts)
    return StepBatch(step, samples, advantages, {**metrics, **timings}, histograms)


def _success_rates(rollouts: list[Sample]) -> list[float]:
    per_group: dict[int, list[float]] = {}
    for s in rollouts:
        per_group.setdefault(s.group_id, []).append(float((s.reward or 0.0) > 0))
    return [sum(v) / len(v) for v in per_group.values()]


def _rollout_metrics(rollouts: list[Sample], max_new_tokens: int) -> dict[str, float]:
    if not rollouts:
        return {}
    lengths = [len(s.response_ids) for s in rollouts]
    return {
        "reward/mean": sum(float(s.reward or 0.0) for s in rollouts) / len(rollouts),
        "response/length_mean": sum(lengths) / len(lengths),
        "response/length_max": float(max(lengths)),
        "response/clipped_share": sum(s.finish_reason == "length" for s in rollouts)
        / len(rollouts),
    }


def train_phase(run: Run, batch: StepBatch) -> dict[str, float]:
    """All ranks: micro-batches -> (old log-probs) -> one or more optimizer updates."""
    cfg, ctx = run.cfg, run.ctx
    spec = run.spec.phase_for_step(batch.step)
    if not batch.samples:
        return {"train/skipped_empty": 1.0}
    mini = _split_groups(batch, cfg.trainer.mini_batches_per_step)
    updates = cfg.trainer.mini_batches_per_step * cfg.trainer.epochs_per_step
    recompute = spec.needs_old_logprobs and (updates > 1 or spec.tis_cap is not None)
    timings = {"time/logprob_s": 0.0, "time/train_s": 0.0}
    shards_per_mini = []
    for samples, advantages in mini:
        shards = build_microbatches(
            samples,
            torch.tensor(advantages),
            dp=ctx.dp,
            max_tokens=cfg.trainer.max_tokens_per_microbatch,
            pad_id=run.tokenizer.pad_token_id or 0,
            pad_to_multiple=ctx.tp,
        )
        if recompute:
            t0 = time.perf_counter()
            attach_old_logprobs(
                shards[ctx.dp_rank], run.trainer.forward_logprobs(shards[ctx.dp_rank])
            )
            timings["time/logprob_s"] += time.perf_counter() - t0
        shards_per_mini.append(shards)
    metrics: dict[str, float] = {}
    for _ in range(cfg.trainer.epochs_per_step):
        for shards in shards_per_mini:
            loss_fn = PolicyLossFn(spec, global_totals(spec, shards), ctx.dp)
            t0 = time.perf_counter()
            result = run.trainer.train_step(shards[ctx.dp_rank], loss_fn)
            timings["time/train_s"] += time.perf_counter() - t0
            metrics = {
                **result.metrics,
                "grad_norm": result.grad_norm,
                "lr": result.lr,
                "train/skipped_update": float(result.skipped),
            }
    metrics["train/rows"] = float(len(batch.samples))
    metrics["train/tokens"] = float(sum(len(s.response_ids) for s in batch.samples))
    return {**metrics, **timings}


def _split_groups(batch: StepBatch, parts: int) -> list[tuple[list[Sample], list[float]]]:
    """Split a step's rows into ``parts`` mini-batches without cutting a prompt group."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(batch.samples):
        groups.setdefault(s.group_id, []).append(i)
    ordered = list(groups.values())
    per = -(-len(ordered) // parts)
    out = []
    for k in range(0, len(ordered), per):
        idx = [i for g in ordered[k : k + per] for i in g]
        out.append(([batch.samples[i] for i in idx], [batch.advantages[i] for i in idx]))
    return out
