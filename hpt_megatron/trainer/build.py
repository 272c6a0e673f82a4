"""Wire a :class:`TrainEngine`: this rank's model chunks (one per virtual stage, built by
``models.provider.build_model_chunks``) in Megatron DDP, the Megatron optimizer (AdamW), the
learning-rate schedule, and the starting weights of a fresh run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.moe import RoutingReplay
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.trainer.engine import PhaseMarker, TrainEngine

if TYPE_CHECKING:
    from megatron.core.transformer.module import MegatronModule

log = logging.getLogger(__name__)


def wrap_ddp(chunks: list[MegatronModule], cfg: TrainerConfig) -> list[MegatronModule]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        config = chunk.config
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=i > 0,  # as Megatron's trainer does for virtual stages
            )
        )
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(
    chunks: list[MegatronModule], cfg: TrainerConfig, total_steps: int
) -> tuple[Any, Any]:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model_cfg = chunks[0].config
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.grad_clip,
        bf16=model_cfg.params_dtype == torch.bfloat16,
        fp16=model_cfg.params_dtype == torch.float16,
        params_dtype=model_cfg.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, chunks)
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr if cfg.lr_schedule == "cosine" else cfg.lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=cfg.warmup_steps + decay_steps,
        lr_decay_style="cosine" if cfg.lr_schedule == "cosine" else "constant",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def build_engine(
    chunks: list[MegatronModule],
    ctx: ParallelContext,
    cfg: TrainerConfig,
    total_steps: int,
    vocab_size: int | None = None,
    *,
    phase: PhaseMarker | None = None,
    routing_replay: bool = False,
) -> TrainEngine:
    """Model chunks -> DDP -> optimizer + schedule -> engine (``routing_replay``: the routers
    take the experts the rollout engine chose, ``models.moe.RoutingReplay``)."""
    chunks = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(chunks, cfg, total_steps)
    replay = RoutingReplay.attach(chunks, ctx.tp_rank, ctx.tp) if routing_replay else None
    return TrainEngine(
        chunks, optimizer, scheduler, ctx, cfg, vocab_size, phase=phase, routing_replay=replay
    )


def build_policy(
    hf: HFModelConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    trainer: TrainerConfig,
    ctx: ParallelContext,
    *,
    total_steps: int,
    phase: PhaseMarker | None = None,
    routing_replay: bool = False,
) -> TrainEngine:
    """The policy's engine on this rank (``phase``, ``routing_replay``: :func:`build_engine`).
    Weights about to be loaded (``model.load`` / ``model.hf_weights``) get no random
    initialisation first; call :func:`init_policy_weights`."""
    from hpt_megatron.models.provider import build_model_chunks

    loads_weights = bool(model.load or model.hf_weights)
    chunks = build_model_chunks(
        hf, model, parallel, pp_rank=ctx.pp_rank, init_weights=not loads_weights
    )
    return build_engine(
        chunks,
        ctx,
        trainer,
        total_steps=total_steps,
        vocab_size=hf.vocab_size,
        phase=phase,
        routing_replay=routing_replay,
    )


def init_policy_weights(engine: TrainEngine, hf: HFModelConfig, model: ModelConfig) -> None:
    """Collective: the starting policy of a fresh run, from ``model.load`` (a Megatron
    checkpoint, any layout) or ``model.hf_weights`` (an HF folder); else the random init stays."""
    ctx = engine.ctx
    if model.load:
        from hpt_megatron.trainer.checkpoint_files import load_checkpoint

        load_checkpoint(model.load, engine.model_chunks)
        log.info("initial weights from the Megatron checkpoint %s", model.load)
    elif model.hf_weights:
        from hpt_megatron.models.loading import load_hf_weights

        modules = [getattr(c, "module", c) for c in engine.model_chunks]
        load_hf_weights(
            modules,
            hf,
            model.hf_weights,
            tp_rank=ctx.tp_rank,
            tp_size=ctx.tp,
            etp_rank=ctx.etp_rank,
            etp_size=ctx.etp,
            progress=ctx.is_driver,
        )
        log.info("initial weights from the HF folder %s", model.hf_weights)
