"""The trainer side of a run on this rank: :class:`Trainer` owns the models (the policy, the
reference when a KL term is on, the critic for advantage ``gae``, the frozen teacher when the
distillation part is on, with its weights at build), their optimizers and
schedules, the update and the checkpointer. The loop (``orchestration/loop.py``) calls it by name:

- :meth:`Trainer.resume` once: the starting weights of every model (a checkpoint's, or those of a
  fresh run), and the step and data position to start from;
- per step, :meth:`Trainer.step` (``trainer/update.py``: the policy update, the reference's KL,
  the teacher's distillation part, the critic's phase), then :meth:`Trainer.save`
  (``trainer/checkpoint.py``);
- :meth:`Trainer.finish` and :meth:`Trainer.export` at the end.

Every method is collective: every rank calls it with the same arguments.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpt_megatron.config import HPTConfig
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.data.sample import Sample
from hpt_megatron.disk import writing
from hpt_megatron.models.export import save_hf_folder
from hpt_megatron.models.hf_config import HFModelConfig, parameter_count
from hpt_megatron.models.hf_io import write_config
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.trainer.batching import microbatch_count_multiple, token_multiple
from hpt_megatron.trainer.build import build_policy, init_policy_weights
from hpt_megatron.trainer.checkpoint import Checkpointer
from hpt_megatron.trainer.critic import Critic, build_critic, init_critic_weights
from hpt_megatron.trainer.engine import PhaseMarker, TrainEngine
from hpt_megatron.trainer.reference import ReferencePolicy
from hpt_megatron.trainer.teacher import TeacherPolicy
from hpt_megatron.trainer.update import PolicyUpdate, UpdateLayout

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run starts: after ``step``, with the driver's data position
    ``sampler`` (``Driver.state_dict``, as saved)."""

    step: int
    sampler: Any


class Trainer:
    """A run's models on this rank and what is done with them (see the module docstring)."""

    def __init__(
        self,
        cfg: HPTConfig,
        ctx: ParallelContext,
        hf: HFModelConfig,
        tokenizer: Any,
        policy: TrainEngine,
        update: PolicyUpdate,
        checkpointer: Checkpointer,
        *,
        phase: PhaseMarker,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.hf = hf
        self.tokenizer = tokenizer
        self.policy = policy
        self.update = update
        self.checkpointer = checkpointer
        self.phase = phase

    @classmethod
    def build(
        cls,
        cfg: HPTConfig,
        ctx: ParallelContext,
        hf: HFModelConfig,
        spec: AlgorithmSpec,
        tokenizer: Any,
        *,
        phase: PhaseMarker,
    ) -> Trainer:
        """Collective: build every model of the run (weights still to be set: :meth:`resume`).
        ``phase``: the hang watchdog's phase marker, around the optimizer steps too."""
        routing_replay = spec.routing_replay == "rollout"
        t0 = time.perf_counter()
        policy = build_policy(
            hf,
            cfg.model,
            cfg.parallel,
            cfg.trainer,
            ctx,
            total_steps=cfg.run.steps,
            phase=phase,
            routing_replay=routing_replay,  # the routers take the experts the rollout chose
        )
        reference = None
        if spec.needs_ref_logprobs:
            offload = cfg.algorithm.reference.offload
            reference = ReferencePolicy.build(
                hf, cfg.model, cfg.parallel, cfg.trainer, ctx, offload
            )
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
        teacher = None
        path = cfg.algorithm.teacher.hf_path
        if spec.needs_teacher_logprobs and path:  # else its servers score the samples
            teacher = TeacherPolicy.build(path, cfg.model, cfg.parallel, cfg.trainer, ctx)
        layout = _layout(cfg, ctx, tokenizer, routing_replay)
        update = PolicyUpdate(policy, layout, reference, critic, teacher)
        checkpointer = _checkpointer(cfg, ctx, hf, tokenizer, critic)
        if ctx.is_driver:
            _log_models(cfg, hf, reference is not None, critic is not None, t0)
        return cls(cfg, ctx, hf, tokenizer, policy, update, checkpointer, phase=phase)

    @property
    def chunks(self) -> list[torch.nn.Module]:
        """The policy's model chunks (what the weight sync sends)."""
        return self.policy.model_chunks

    @property
    def last_complete(self) -> Path | None:
        """The newest checkpoint known complete."""
        return self.checkpointer.last_complete

    def resume(self) -> Resumed | None:
        """Collective: every model's weights, from the checkpoint ``run.resume`` names (None
        when there is none: a fresh run's starting weights)."""
        cfg = self.cfg
        with self.phase("checkpoint"):
            state = self.checkpointer.resume(cfg.run.resume, self.policy)
        if state is None:
            init_policy_weights(self.policy, self.hf, cfg.model)
        critic = self.update.critic
        if critic is not None and state is None:
            init_critic_weights(critic.engine, self.policy, critic.cfg)
        reference = self.update.reference
        if reference is not None:
            saved = self.checkpointer.reference_dir
            assert saved is not None
            ref_cfg = cfg.algorithm.reference
            reference.load_weights(self.policy, self.hf, cfg.model, ref_cfg, saved, state is None)
        if state is None:
            if self.ctx.is_driver:
                log.info(
                    "no checkpoint to resume from (run.resume=%s): starting at step 1",
                    cfg.run.resume,
                )
            return None
        return Resumed(int(state["step"]), state.get("sampler"))

    def step(self, samples: list[Sample], spec: AlgorithmSpec, step: int) -> dict[str, float]:
        """Collective: the update of ``step`` (0-based) on ``samples``; its metrics."""
        return self.update.update(samples, spec, step)

    def poll(self) -> None:
        """Collective, cheap: complete an asynchronous save whose files are all written."""
        self.checkpointer.poll()

    def save(
        self, step: int, score: float | None, sampler: dict[str, Any] | None, force: bool
    ) -> bool:
        """Collective: save after ``step`` (1-based) when it is due, ``score`` is a new best
        validation score or ``force``; ``sampler``: the data position to resume from."""
        extra = {"sampler": sampler}
        return self.checkpointer.maybe_save(step, self.policy, score, extra, force=force)

    def take_staging_wait(self) -> float:
        """The time updates waited for a background save's snapshot since the last call."""
        return self.checkpointer.take_staging_wait()

    def finish(self) -> None:
        """Collective: wait for an asynchronous save still being written."""
        with self.phase("checkpoint"):
            self.checkpointer.wait()

    def abandon(self) -> None:
        """Not collective: after a failure, a checkpoint still being written is removed."""
        self.checkpointer.abandon()

    def export(self) -> Path:
        """Collective: the policy as an HF folder ``<run_dir>/hf`` (config, shards, tokenizer);
        the critic beside it as ``hf_critic``, for ``AutoModelForTokenClassification``. A
        write that fails is a :class:`~hpt_megatron.disk.WriteError`, the partial folder
        removed."""
        run_dir = Path(self.cfg.run.run_dir)
        out = run_dir / "hf"
        modules = [getattr(c, "module", c) for c in self.policy.model_chunks]
        dtype = _DTYPE_NAMES[modules[0].config.params_dtype]
        with writing(out, "HF export", partial=out):  # a failing rank removes the partial folder
            save_hf_folder(modules, self.hf, out, self.ctx, torch_dtype=dtype)
            if self.ctx.is_driver:
                self.tokenizer.save_pretrained(str(out))
        if self.update.critic is not None:
            from hpt_megatron.models.value import save_value_hf_folder

            critic = [getattr(c, "module", c) for c in self.update.critic.engine.model_chunks]
            critic_dtype = _DTYPE_NAMES[critic[0].config.params_dtype]
            folder = run_dir / "hf_critic"
            with writing(folder, "critic's HF export", partial=folder):
                save_value_hf_folder(critic, self.hf, folder, self.ctx, torch_dtype=critic_dtype)
                if self.ctx.is_driver:
                    self.tokenizer.save_pretrained(str(folder))
        if self.ctx.is_driver:
            log.info("exported the final policy as a Hugging Face folder: %s", out.absolute())
        return out


def _log_models(
    cfg: HPTConfig, hf: HFModelConfig, reference: bool, critic: bool, t0: float
) -> None:
    """The start-up line of the model build, and what warm-up does to the first updates."""
    others = [name for name, built in (("reference", reference), ("critic", critic)) if built]
    log.info(
        "model: %s, %.4g M parameters (tp %d x pp %d shards, %s)%s, built in %.1f s",
        hf.model_type,
        parameter_count(hf) / 1e6,
        cfg.parallel.tp,
        cfg.parallel.pp,
        cfg.model.params_dtype,
        f", with a {' and a '.join(others)}" if others else "",
        time.perf_counter() - t0,
    )
    warmup = cfg.trainer.warmup_steps
    if warmup:
        log.info(
            "trainer.warmup_steps=%d: update k uses lr %g * (k-1)/%d, so update 1 runs at lr 0 "
            "(it moves no weight; its gradient feeds Adam's moments) and update %d reaches %g; "
            "the logged lr is the one each update used (an update: one of "
            "trainer.mini_batches_per_step x epochs_per_step per step)",
            warmup,
            cfg.trainer.lr,
            warmup,
            warmup + 1,
            cfg.trainer.lr,
        )


def _layout(
    cfg: HPTConfig, ctx: ParallelContext, tokenizer: Any, routing_replay: bool
) -> UpdateLayout:
    return UpdateLayout(
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


def _checkpointer(
    cfg: HPTConfig, ctx: ParallelContext, hf: HFModelConfig, tokenizer: Any, critic: Critic | None
) -> Checkpointer:
    run_dir = Path(cfg.run.run_dir)

    def describe(path: Path) -> None:  # checkpoints are self-contained for hpt eval / convert
        write_config(hf, path)
        tokenizer.save_pretrained(str(path))

    return Checkpointer(
        run_dir / "checkpoints",
        ctx,
        save_every=cfg.checkpoint.save_every,
        keep_last=cfg.checkpoint.keep_last,
        last_step=cfg.run.steps,
        describe=describe,
        background=cfg.checkpoint.async_save,
        critic=None if critic is None else critic.engine,
        reference_dir=run_dir / "reference",
    )
