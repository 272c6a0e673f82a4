"""Build every component of a run from the resolved config (constructors wire; this computes)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpt_megatron.algorithms import AlgorithmSpec
from hpt_megatron.config import HPTConfig, dump_yaml
from hpt_megatron.data import build_arithmetic_tokenizer, build_prompt_dataset, build_sampler
from hpt_megatron.data.dataset import PromptDataset
from hpt_megatron.data.sampler import PromptSampler
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.provider import (
    build_model_chunks,
    check_hf_supported,
    check_parallel_against_model,
    hf_config_with_overrides,
    load_hf_config,
)
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rewards import RewardPool
from hpt_megatron.rollout.base import RolloutEngine
from hpt_megatron.trainer.build import build_engine
from hpt_megatron.trainer.engine import TrainEngine

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything one run holds. Driver-only parts are None on other ranks."""

    cfg: HPTConfig
    ctx: ParallelContext
    run_dir: Path
    hf: HFModelConfig
    spec: AlgorithmSpec
    tokenizer: Any
    trainer: TrainEngine
    sampler: PromptSampler | None
    train_set: PromptDataset | None
    val_set: PromptDataset | None
    engine: RolloutEngine | None
    pool: RewardPool | None


def resolve_model_config(cfg: HPTConfig) -> HFModelConfig:
    """The HF config of the policy, with overrides; checked against the parallel layout."""
    hf = load_hf_config(cfg.model.hf_config or dict(cfg.model.inline))
    hf = hf_config_with_overrides(hf, cfg.model)
    check_hf_supported(hf)
    check_parallel_against_model(hf, cfg.parallel)
    return hf


def load_tokenizer(cfg: HPTConfig, run_dir: Path) -> Any:
    source = cfg.model.tokenizer or cfg.model.hf_weights or cfg.model.hf_config
    if source in (None, "arithmetic"):
        return build_arithmetic_tokenizer(run_dir / "tokenizer")
    from transformers import AutoTokenizer

    path = Path(source)
    if not path.exists():
        raise ValueError(f"model.tokenizer: {source} does not exist")
    return AutoTokenizer.from_pretrained(str(path if path.is_dir() else path.parent))


def build_rollout_engine(cfg: HPTConfig, hf: HFModelConfig, tokenizer: Any, run_dir: Path):  # noqa: ANN201
    """The driver's rollout engine; its weights are overwritten from the trainer at step 0."""
    if cfg.rollout.engine == "cpu":
        from hpt_megatron.rollout.cpu_engine import HFCpuEngine

        return HFCpuEngine.from_config(
            hf,
            max_batch_rows=cfg.rollout.cpu.max_batch_rows,
            seed=cfg.run.seed,
            tokenizer=tokenizer,
            eos_token_ids=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
    from hpt_megatron.rollout.sglang import build_sglang_engine

    rollout = cfg.rollout
    overrides = {k: getattr(cfg.model, k) for k in ("rope_theta", "max_position_embeddings")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides and cfg.model.hf_weights:  # the served checkpoint must use the trainer's RoPE
        import dataclasses
        import json

        extra = [*rollout.sglang.extra_args, "--json-model-override-args", json.dumps(overrides)]
        sglang = dataclasses.replace(rollout.sglang, extra_args=extra)
        rollout = dataclasses.replace(rollout, sglang=sglang)
    # Serve the starting HF checkpoint when there is one (no random full-size copy to write).
    return build_sglang_engine(rollout, hf=hf, tokenizer=tokenizer, run_dir=run_dir,
                               model_path=cfg.model.hf_weights)  # fmt: skip


def build_run(cfg: HPTConfig, ctx: ParallelContext) -> Run:
    run_dir = Path(cfg.run.run_dir)
    hf = resolve_model_config(cfg)
    spec = cfg.algorithm.spec()
    if ctx.is_driver:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
    _barrier(ctx)
    tokenizer = load_tokenizer(cfg, run_dir)
    if len(tokenizer) > hf.vocab_size:
        raise ValueError(
            f"model vocab_size {hf.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )

    # Weights about to be loaded (model.load / model.hf_weights) need no random init first.
    loads_weights = bool(cfg.model.load or cfg.model.hf_weights)
    chunks = build_model_chunks(hf, cfg.model, cfg.parallel, pp_rank=ctx.pp_rank,
                                init_weights=not loads_weights)  # fmt: skip
    trainer = build_engine(
        chunks, ctx, cfg.trainer, total_steps=cfg.run.steps, vocab_size=hf.vocab_size
    )
    sampler = train_set = val_set = engine = pool = None
    if ctx.is_driver:
        train_set = build_prompt_dataset(cfg.data, tokenizer, "train")
        sampler = build_sampler(cfg.data, train_set, cfg.run.seed)
        if cfg.data.val or (cfg.data.train == "arithmetic" and cfg.run.val_every):
            val_cfg = cfg.data if cfg.data.val else _with_val(cfg)
            val_set = build_prompt_dataset(val_cfg, tokenizer, "val")
        engine = build_rollout_engine(cfg, hf, tokenizer, run_dir)
        pool = RewardPool(
            num_workers=cfg.reward.num_workers,
            timeout_s=cfg.reward.timeout_s,
            memory_limit_mb=cfg.reward.memory_limit_mb,
        )
    return Run(
        cfg, ctx, run_dir, hf, spec, tokenizer, trainer, sampler, train_set, val_set, engine, pool
    )


def init_policy_weights(run: Run) -> None:
    """Collective: the starting policy of a fresh run, from ``model.load`` (a Megatron
    checkpoint, any layout) or ``model.hf_weights`` (an HF folder); else the random init."""
    cfg, chunks = run.cfg.model, run.trainer.model_chunks
    if cfg.load:
        from hpt_megatron.trainer.checkpoint import load_checkpoint

        load_checkpoint(cfg.load, chunks)
        log.info("initial weights from the Megatron checkpoint %s", cfg.load)
    elif cfg.hf_weights:
        from hpt_megatron.models.loading import load_hf_weights

        modules = [getattr(c, "module", c) for c in chunks]
        load_hf_weights(modules, run.hf, cfg.hf_weights, tp_rank=run.ctx.tp_rank,
                        tp_size=run.ctx.tp, progress=run.ctx.is_driver)  # fmt: skip
        log.info("initial weights from the HF folder %s", cfg.hf_weights)


def _with_val(cfg: HPTConfig):  # noqa: ANN202
    import dataclasses

    return dataclasses.replace(cfg.data, val="arithmetic")


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        torch.distributed.barrier(group=ctx.cpu_group)
