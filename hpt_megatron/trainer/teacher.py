"""The frozen teacher of the distillation part, and what the update takes from it.

Shape legend: B rows of a micro-batch, S padded sequence length, T response tokens of a row.

The teacher is a forward-only Megatron model built from ``algorithm.teacher.hf_path`` (its own
``config.json`` and weights: any size of the policy's architecture family) in the policy's
parallel layout (the same TP/PP ranks, no DDP, no optimizer), built like the reference
(``trainer/reference.py``). Its per-token log-probs come from the policy engine's forward path
(``TrainEngine.forward_logprobs``: Megatron's schedule, vocab-parallel log-probs over the
teacher's own vocabulary) on the policy's micro-batches, so they line up with pi_old token for
token. Teacher and policy share the tokenizer's vocabulary (preflight's check).

With ``algorithm.teacher.urls`` instead, no model is built here: the driver has the teacher's
SGLang servers score each rollout (``rollout/sglang/scoring.py``) and the log-probs come with
the samples (``MicroBatch.teacher_logprobs_bs``).

Per step, :func:`attach_teacher` adds the distillation part ``distill_coef * (log pi_T -
log pi_old)`` (``algorithms/distill.py``) to the advantages of every on-policy RL token, in each
last-stage rank's own micro-batches (no collective: every TP rank of the stage has the same
log-probs), and measures the per-token reverse KL ``log pi_old - log pi_T``: mean and max over
the teacher-routed rows (HPT's distillation route, ``metadata['route'] == 'teacher'``) and over
the other RL rows, gathered from every data-parallel rank.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from hpt_megatron.algorithms import distill_advantages
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.data.sample import TEACHER_ROUTE, Sample
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.trainer.batching import MicroBatch
from hpt_megatron.trainer.engine import TrainEngine
from hpt_megatron.trainer.reference import frozen_engine
from hpt_megatron.trainer.rows import RowKey, gather_rows, owns_rows, response_rows

log = logging.getLogger(__name__)


class TeacherPolicy:
    """This rank's frozen teacher chunks and their forward."""

    def __init__(self, engine: TrainEngine, hf: HFModelConfig) -> None:
        self.engine = engine  # no optimizer: used for its forward path only
        self.hf = hf

    @classmethod
    def build(
        cls,
        path: str,
        model: ModelConfig,
        parallel: ParallelConfig,
        trainer: TrainerConfig,
        ctx: ParallelContext,
    ) -> TeacherPolicy:
        """Collective: the teacher of ``path`` in the policy's layout, with its weights.

        ``model``'s numerics (dtype, layer implementation, vocabulary padding) are the
        policy's; its architecture overrides (RoPE theta, positions) are not applied.
        """
        from hpt_megatron.models.loading import load_hf_weights
        from hpt_megatron.models.provider import check_parallel_against_model, load_hf_config

        hf = load_hf_config(path)
        check_parallel_against_model(hf, parallel)
        own = dataclasses.replace(
            model,
            hf_config=path,
            inline={},
            load=None,
            hf_weights=path,
            tokenizer=None,
            rope_theta=None,
            max_position_embeddings=None,
        )
        engine = frozen_engine(hf, own, parallel, trainer, ctx)
        load_hf_weights(
            engine.model_chunks,
            hf,
            path,
            tp_rank=ctx.tp_rank,
            tp_size=ctx.tp,
            etp_rank=ctx.etp_rank,
            etp_size=ctx.etp,
        )
        log.info("teacher: %s (%s), weights from %s", hf.model_type, hf.source, path)
        return cls(engine, hf)

    def forward_logprobs(self, microbatches: list[MicroBatch]) -> list[torch.Tensor] | None:
        """log pi_T ``[B, S]`` of every micro-batch on last-stage ranks (None elsewhere)."""
        out = self.engine.forward_logprobs(microbatches)
        return None if out is None else [logprobs_bs for logprobs_bs, _ in out]


def attach_teacher(
    ctx: ParallelContext,
    teacher: TeacherPolicy | None,
    spec: AlgorithmSpec,
    minis: list[list[Sample]],
    local: list[list[MicroBatch]],
    owned: list[bool],
) -> dict[str, float]:
    """Collective: the teacher's log-probs of every micro-batch; the distillation part added to
    ``advantages_bs`` of the on-policy RL tokens; the reverse-KL metrics (module docstring).

    ``teacher`` None: the log-probs came with the samples (``algorithm.teacher.urls``: the
    driver had the teacher's servers score them), as each micro-batch's ``teacher_logprobs_bs``.
    ``local[k]`` are this rank's micro-batches of ``minis[k]`` with ``old_logprobs_bs`` set (on
    last-stage ranks); ``owned[k]``: whether this rank holds rows of ``minis[k]``.
    """
    kl_local: dict[RowKey, torch.Tensor] = {}
    for k, microbatches in enumerate(local):
        outputs = _teacher_logprobs(teacher, microbatches)
        if outputs is None:
            continue
        for mb, teacher_bs in zip(microbatches, outputs):
            assert mb.old_logprobs_bs is not None  # the update computes pi_old first
            on_bs = mb.loss_mask_bs * _rl_rows_b(mb)[:, None].to(mb.loss_mask_bs.dtype)
            teacher_bs = teacher_bs.float() * mb.loss_mask_bs
            part_bs = distill_advantages(
                logprobs=mb.old_logprobs_bs,
                teacher_logprobs=teacher_bs,
                response_mask=on_bs,
                coef=spec.distill_coef,
            )
            mb.advantages_bs = mb.advantages_bs + part_bs.to(mb.advantages_bs.dtype)
            if owned[k]:
                kl_bs = mb.old_logprobs_bs - teacher_bs
                for idx, kl_t in response_rows(kl_bs, mb).items():
                    if minis[k][idx].rl_weight != 0 and not minis[k][idx].is_demo:
                        kl_local[(k, idx)] = kl_t
    kl_rows = gather_rows(ctx, kl_local, owns_rows(ctx))
    return _kl_metrics(minis, kl_rows)


def _teacher_logprobs(
    teacher: TeacherPolicy | None, microbatches: list[MicroBatch]
) -> list[torch.Tensor] | None:
    """log pi_T ``[B, S]`` of the micro-batches where pi_old is (the last stage), else None."""
    if teacher is not None:
        return teacher.forward_logprobs(microbatches)
    if not microbatches or microbatches[0].old_logprobs_bs is None:
        return None
    out = []
    for mb in microbatches:
        assert mb.old_logprobs_bs is not None
        if mb.teacher_logprobs_bs is not None:
            out.append(mb.teacher_logprobs_bs.to(mb.old_logprobs_bs.device))
            continue
        if mb.loss_mask_bs[_rl_rows_b(mb)].any():
            raise ValueError(
                "teacher: the distillation part is on, but the samples carry no teacher "
                "log-probs (algorithm.teacher.urls scores them) and no teacher model was built"
            )
        out.append(torch.zeros_like(mb.old_logprobs_bs))  # no RL token: nothing to score
    return out


def _rl_rows_b(mb: MicroBatch) -> torch.Tensor:
    """``[B]`` bool: the on-policy RL rows of ``mb`` (RL weight, not a demonstration), the rows
    the distillation part applies to."""
    return (mb.rl_weight_b != 0) & ~mb.is_demo_b


def _kl_metrics(minis: list[list[Sample]], kl_rows: dict[RowKey, torch.Tensor]) -> dict[str, float]:
    """``teacher/kl_{rl,distill}_{mean,max}``: the per-token reverse KL over the RL-routed and
    the teacher-routed rows (a route without rows reports nothing)."""
    routes: dict[str, list[torch.Tensor]] = {"rl": [], "distill": []}
    for (k, idx), kl_t in kl_rows.items():
        teacher_routed = minis[k][idx].metadata.get("route") == TEACHER_ROUTE
        routes["distill" if teacher_routed else "rl"].append(kl_t.double())
    metrics = {}
    for route, rows in routes.items():
        values = torch.cat(rows) if rows else torch.zeros(0)
        if values.numel():
            metrics[f"teacher/kl_{route}_mean"] = float(values.mean())
            metrics[f"teacher/kl_{route}_max"] = float(values.max())
    return metrics
