"""The driver: the rank-0 object that owns the data, the rollout engine and the reward pool.

It exists on the driver rank only (no other rank carries its parts). Per step it draws prompts,
generates n responses each, grades them, applies the preset's batch rule and attaches the
advantages, and hands back a :class:`RolloutBatch` that every rank trains on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hpt_megatron.config import HPTConfig
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.config.data import RewardConfig
from hpt_megatron.data import build_prompt_dataset, build_sampler
from hpt_megatron.data.dataset import PromptDataset
from hpt_megatron.data.records import PromptRecord
from hpt_megatron.data.sample import RolloutBatch, Sample
from hpt_megatron.data.sampler import PromptSampler
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.orchestration.batch_rules import (
    apply_batch_rule,
    attach_advantages,
    demo_sample,
    rollouts_per_prompt,
    shape_overlong,
)
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rewards import RewardPool
from hpt_megatron.rollout.base import RolloutEngine, SamplingParams
from hpt_megatron.rollout.factory import (
    build_rollout_engine,
    build_teacher_engine,
    sampling_params,
)
from hpt_megatron.rollout.plan import RolloutPlan
from hpt_megatron.rollout.seeds import derive_seed

if TYPE_CHECKING:
    from hpt_megatron.rollout.sglang.engine import SGLangEngine
    from hpt_megatron.rollout.sglang.nodes import NodeServerGroup

MAX_REFILL_ROUNDS = 4  # DAPO dynamic sampling: extra prompt batches drawn to refill a step

log = logging.getLogger(__name__)


class Driver:
    """Rank 0's sampler, datasets, rollout engine and reward pool; rollouts and validation
    accuracy (:meth:`evaluate`)."""

    def __init__(
        self,
        cfg: HPTConfig,
        tokenizer: Any,
        sampler: PromptSampler,
        val_set: PromptDataset | None,
        engine: RolloutEngine,
        pool: RewardPool,
        teacher: RolloutEngine | None = None,
    ) -> None:
        self.cfg = cfg
        # The teacher's servers (algorithm.teacher.urls: they score the rollouts), or the model
        # that writes demonstrations (teacher_route: generate); see build_teacher_engine.
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.val_set = val_set
        self.engine = engine
        self.pool = pool
        self._generated = False  # the first generation is announced in the log

    @classmethod
    def build(
        cls,
        cfg: HPTConfig,
        plan: RolloutPlan,
        hf: HFModelConfig,
        tokenizer: Any,
        run_dir: Path,
        ctx: ParallelContext,
        nodes: NodeServerGroup | None = None,
    ) -> Driver:
        train_set = build_prompt_dataset(cfg.data, tokenizer, "train")
        sampler = build_sampler(cfg.data, train_set, derive_seed(cfg.run.seed, "sampler"))
        val_set = None
        if cfg.data.val or (cfg.data.train == "arithmetic" and cfg.run.val_every):
            val_cfg = cfg.data if cfg.data.val else dataclasses.replace(cfg.data, val="arithmetic")
            val_set = build_prompt_dataset(val_cfg, tokenizer, "val")
        reward = cfg.reward
        pool = RewardPool(
            num_workers=reward.num_workers,
            timeout_s=reward.timeout_s,
            memory_limit_mb=reward.memory_limit_mb,
        )
        _log_data(cfg, train_set, val_set)
        try:
            t0 = time.perf_counter()
            engine = build_rollout_engine(plan, cfg, hf, tokenizer, run_dir, ctx, nodes)
        except BaseException:
            pool.close()
            raise
        log.info(
            "rollout engine %s ready (%s placement) in %.1f s",
            cfg.rollout.engine,
            cfg.run.placement,
            time.perf_counter() - t0,
        )
        try:
            teacher = build_teacher_engine(plan, cfg, tokenizer, run_dir)
        except BaseException:
            pool.close()
            engine.shutdown()
            raise
        return cls(cfg, tokenizer, sampler, val_set, engine, pool, teacher)

    def close(self) -> None:
        self.pool.close()
        self.engine.shutdown()
        if self.teacher is not None:
            self.teacher.shutdown()

    # ------------------------------------------------------------------------------ rollouts
    def sampling_params(self, step: int) -> SamplingParams:
        """The rollout sampling, seeded per step (a resumed run draws the same samples)."""
        cfg = self.cfg
        return sampling_params(
            cfg.rollout,
            seed=derive_seed(cfg.run.seed, "rollout", step),
            max_new_tokens=min(cfg.rollout.max_new_tokens, cfg.data.max_response_tokens),
            stop_token_ids=[self.tokenizer.eos_token_id],
        )

    def rollout(self, step: int, spec: AlgorithmSpec) -> RolloutBatch:
        """Prompts -> rollouts -> rewards -> the batch rule -> advantages, for ``step``."""
        sampler_state = self.sampler.state_dict()
        prompts = self.sampler.next_batch()
        timings = {"time/generation_s": 0.0, "time/grading_s": 0.0}
        if spec.advantage == "one":  # SFT: train on the demonstrations, nothing to generate
            samples = [
                demo_sample(p, g, sft_weight=0.0, rl_weight=1.0) for g, p in enumerate(prompts)
            ]
            attach_advantages(spec, samples)  # A = 1
            sft_metrics = {"sft/rows": float(len(samples)), **timings}
            return RolloutBatch(samples, step, sft_metrics, sampler_state=sampler_state)
        params = self.sampling_params(step)
        params.n = rollouts_per_prompt(spec, params.n)
        kept: list[Sample] = []
        rollouts: list[Sample] = []
        metrics: dict[str, float] = {}

        def write_demos(lacking: list[PromptRecord]) -> list[list[int] | None]:
            t0 = time.perf_counter()
            demos = self.write_demos(lacking, spec)
            elapsed = time.perf_counter() - t0  # summed over DAPO's refill rounds
            timings["time/teacher_generation_s"] = (
                timings.get("time/teacher_generation_s", 0) + elapsed
            )
            return demos

        announce = not self._generated  # the run's first generation is announced in the log
        self._generated = True
        for round_ in range(MAX_REFILL_ROUNDS + 1):
            if announce:
                log.info(
                    "step %d: generating %d responses (%d prompts x %d, up to %d tokens each)",
                    step + 1,
                    len(prompts) * params.n,
                    len(prompts),
                    params.n,
                    params.max_new_tokens,
                )
            t0 = time.perf_counter()
            fresh = self._generate(prompts, params, group_offset=len(rollouts) // params.n)
            t1 = time.perf_counter()
            if announce:
                announce = False
                log.info("step %d: generated in %.1f s; grading and training", step + 1, t1 - t0)
            grade_samples(self.pool, fresh, self.cfg.reward)
            timings["time/generation_s"] += t1 - t0
            timings["time/grading_s"] += time.perf_counter() - t1
            rollouts += fresh
            shape_overlong(spec, fresh, params.max_new_tokens)
            plan = apply_batch_rule(spec, prompts, fresh, write_demos)
            kept += plan.samples
            metrics.update(plan.metrics)
            enough = len(kept) >= self.cfg.data.prompts_per_step * params.n
            if spec.batch_rule != "dynamic_sampling" or enough or round_ == MAX_REFILL_ROUNDS:
                break
            prompts = self.sampler.next_batch()  # DAPO: refill with fresh prompts
        attach_advantages(spec, kept)
        if self.cfg.algorithm.teacher.urls and spec.needs_teacher_logprobs:
            t0 = time.perf_counter()  # the teacher is its servers (build_teacher_engine)
            score_with_teacher(cast("SGLangEngine", self.teacher), kept)
            timings["time/teacher_s"] = time.perf_counter() - t0
        metrics.update(_rollout_metrics(rollouts))
        metrics.update(self.damage_metrics())
        histograms = {"reward/per_prompt_success": _success_rates(rollouts)}
        return RolloutBatch(kept, step, {**metrics, **timings}, histograms, sampler_state)

    def evaluate(self) -> dict[str, float]:
        """Accuracy on the validation set ({} without one): ``run.val_n`` responses per prompt
        at ``run.val_temperature`` / ``run.val_top_p`` (default greedy, one), scored as
        :func:`validation_metrics` with ``run.val_score``."""
        if self.val_set is None:
            return {}
        t0 = time.perf_counter()
        run = self.cfg.run
        prompts = list(self.val_set)[: run.val_max_prompts]
        params = sampling_params(
            self.cfg.rollout,
            n=run.val_n,
            temperature=run.val_temperature,
            top_p=run.val_top_p,
            # greedy: no draw; sampled: the same draws at every validation (comparable scores)
            seed=derive_seed(run.seed, "validation") if run.val_temperature > 0 else 0,
            max_new_tokens=self.cfg.data.max_response_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],
        )
        samples = self._generate(prompts, params)
        grade_samples(self.pool, samples, self.cfg.reward)
        metrics = validation_metrics(samples, run.val_score)
        return {**metrics, "time/validation_s": time.perf_counter() - t0}

    def write_demos(
        self, prompts: list[PromptRecord], spec: AlgorithmSpec
    ) -> list[list[int] | None]:
        """HPT's ``teacher_route: generate``: the teacher's greedy response to each prompt (up to
        the rollouts' length), kept where the reward grades it correct (``success_threshold``);
        None where it does not, so no wrong answer is imitated."""
        if self.teacher is None:
            raise ValueError("teacher_route generate: the run has no teacher engine")
        params = sampling_params(
            self.cfg.rollout,
            n=1,
            temperature=0.0,
            top_p=1.0,
            top_k=-1,
            seed=0,
            max_new_tokens=min(self.cfg.rollout.max_new_tokens, self.cfg.data.max_response_tokens),
            stop_token_ids=[self.tokenizer.eos_token_id],
        )
        demos = self._generate(prompts, params, engine=self.teacher)
        grade_samples(self.pool, demos, self.cfg.reward)
        out: list[list[int] | None] = [None] * len(prompts)
        for demo in demos:
            if float(demo.reward or 0.0) > spec.success_threshold and demo.response_ids:
                out[demo.group_id] = demo.response_ids
        return out

    def _generate(
        self,
        prompts: list[PromptRecord],
        params: SamplingParams,
        group_offset: int = 0,
        engine: RolloutEngine | None = None,
    ) -> list[Sample]:
        """``params.n`` responses per prompt from ``engine`` (default: the rollout engine);
        ``group_id`` is the prompt's index plus the offset."""
        engine = self.engine if engine is None else engine
        generations = engine.generate([p.prompt_ids for p in prompts], params)
        texts = self.tokenizer.batch_decode(
            [g.token_ids for g in generations], skip_special_tokens=True
        )
        samples = []
        for gen, text in zip(generations, texts):
            prompt = prompts[gen.prompt_index]
            samples.append(
                Sample(
                    prompt_id=prompt.prompt_id,
                    group_id=gen.prompt_index + group_offset,
                    prompt_ids=list(prompt.prompt_ids),
                    response_ids=list(gen.token_ids),
                    rollout_logprobs=gen.logprobs,
                    ground_truth=prompt.ground_truth,
                    response_text=text,
                    finish_reason=gen.finish_reason,
                    weight_version=gen.weight_version,
                    token_versions=gen.token_versions,
                    routed_experts=gen.routed_experts,
                    metadata={"data_source": prompt.data_source},
                )
            )
        return samples

    def damage_metrics(self) -> dict[str, float]:
        """Running counts of what was lost on the way and scored 0 or skipped."""
        stats, data = self.pool.stats, self.sampler.dataset
        return {
            "reward/timeouts_total": float(stats.timeouts),
            "reward/crashes_total": float(stats.crashes),
            "reward/errors_total": float(stats.errors),
            "data/bad_rows": float(data.stats.bad_rows if isinstance(data, PromptDataset) else 0),
            "rollout/server_restarts_total": float(self.engine.restarts),
            **_server_metrics(self.engine),
        }

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def score_with_teacher(teacher: SGLangEngine, samples: list[Sample]) -> None:
    """The teacher servers' log-probs of every on-policy RL row's response, in place."""
    rows = [s for s in samples if s.rl_weight != 0 and not s.is_demo and s.response_ids]
    scores = teacher.score([s.prompt_ids for s in rows], [s.response_ids for s in rows])
    for sample, logprobs in zip(rows, scores):
        sample.teacher_logprobs = logprobs


def grade_samples(pool: RewardPool, samples: list[Sample], cfg: RewardConfig) -> None:
    """Fill ``sample.reward`` in place (a hang or crash scores 0, see ``RewardPool``)."""
    if not samples:
        return
    rewards = pool.grade(
        [s.response_text or "" for s in samples],
        [s.ground_truth or "" for s in samples],
        [cfg.fn_for(s.metadata.get("data_source", "")) for s in samples],
    )
    for sample, reward in zip(samples, rewards):
        sample.reward = float(reward)


def validation_metrics(samples: list[Sample], score: str = "pooled") -> dict[str, float]:
    """``val/accuracy/<data source>``: each source's share of correct responses (avg@k over its
    prompts' k responses each), and ``val/accuracy``: the pooled share over all responses
    (``score="pooled"``) or the mean of the sources' shares (``"source_mean"``, the official
    HPT code's ``avg_score``: Unify-Post-Training hpt/verl/verl/trainer/ppo/ray_trainer.py:
    484-496 and mix_trainer.py:1242-1245, which also picks the best checkpoint by it)."""
    per_source: dict[str, list[float]] = {}
    for s in samples:
        source = str(s.metadata.get("data_source", ""))
        per_source.setdefault(source, []).append(float((s.reward or 0.0) > 0))
    shares = {k: sum(v) / len(v) for k, v in sorted(per_source.items())}
    if score == "source_mean":
        accuracy = sum(shares.values()) / max(1, len(shares))
    else:
        accuracy = sum(map(sum, per_source.values())) / max(1, len(samples))
    return {"val/accuracy": accuracy, **{f"val/accuracy/{k}": v for k, v in shares.items()}}


def _server_metrics(engine: RolloutEngine) -> dict[str, float]:
    """An SGLang engine's per-server metrics (``rollout/requests/server_<i>``, ...)."""
    counts = getattr(engine, "server_metrics", None)
    return counts() if callable(counts) else {}


def _success_rates(rollouts: list[Sample]) -> list[float]:
    per_group: dict[int, list[float]] = {}
    for s in rollouts:
        per_group.setdefault(s.group_id, []).append(float((s.reward or 0.0) > 0))
    return [sum(v) / len(v) for v in per_group.values()]


def _rollout_metrics(rollouts: list[Sample]) -> dict[str, float]:
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


def _log_data(cfg: HPTConfig, train_set: PromptDataset, val_set: PromptDataset | None) -> None:
    """The start-up line of the data: prompts kept of each set, and a step's share."""
    data, stats = cfg.data, train_set.stats
    val = f"; val {data.val or 'arithmetic'}: {len(val_set)} prompts" if val_set else ""
    log.info(
        "data: train %s: %d prompts (of %d rows: %d bad, %d over the length limits), %d per "
        "step (%d steps: %.2g epochs)%s",
        data.train,
        len(train_set),
        stats.rows,
        stats.bad_rows,
        stats.overlong_filtered,
        data.prompts_per_step,
        cfg.run.steps,
        cfg.run.steps * data.prompts_per_step / max(1, len(train_set)),
        val,
    )
