"""Validation on the held-out set, run checkpoints (with the best one kept), and the final HF
export of the policy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hpt_megatron.models.export import save_hf_folder
from hpt_megatron.models.hf_io import write_config
from hpt_megatron.orchestration.components import Run
from hpt_megatron.orchestration.rollout_step import generate_samples, grade_samples
from hpt_megatron.rollout.factory import sampling_params
from hpt_megatron.trainer.checkpoint import prune_checkpoints, save_checkpoint, step_dir

BEST = "best"


def validate(run: Run, step: int) -> dict[str, float]:
    """Driver: greedy accuracy on ``data.val`` (other ranks return nothing and do not wait)."""
    if not run.ctx.is_driver or run.val_set is None:
        return {}
    assert run.engine is not None and run.pool is not None
    t0 = time.perf_counter()
    prompts = list(run.val_set)[: run.cfg.run.val_max_prompts]
    params = sampling_params(
        run.cfg.rollout,
        n=1,
        temperature=0.0,
        max_new_tokens=run.cfg.data.max_response_tokens,
        stop_token_ids=[run.tokenizer.eos_token_id],
        seed=0,
    )
    samples = generate_samples(run.engine, prompts, params, run.tokenizer)
    grade_samples(run.pool, samples, run.cfg.reward)
    accuracy = sum(float((s.reward or 0.0) > 0) for s in samples) / max(1, len(samples))
    return {"val/accuracy": accuracy, "time/validation_s": time.perf_counter() - t0}


def save_run_checkpoint(run: Run, step: int, state: dict[str, Any], *, is_best: bool) -> None:
    """Collective: ``checkpoints/step_N`` (model + optimizer), pruned; ``checkpoints/best``."""
    root = run.run_dir / "checkpoints"
    paths = [
        save_checkpoint(step_dir(root, step), run.trainer.model_chunks, run.trainer.optimizer,
                        state, group=run.ctx.cpu_group)
    ]  # fmt: skip
    if is_best:
        paths.append(save_checkpoint(root / BEST, run.trainer.model_chunks, None, state,
                                     group=run.ctx.cpu_group))  # fmt: skip
    if run.ctx.is_driver:  # self-contained: hpt eval / the converter need no other folder
        for path in paths:
            write_config(run.hf, path)
            run.tokenizer.save_pretrained(str(path))
    if run.ctx.is_driver:
        prune_checkpoints(root, run.cfg.checkpoint.keep_last)


def export_final(run: Run) -> Path | None:
    """Collective: the final policy as an HF folder ``<run_dir>/hf`` (config, shards, tokenizer)."""
    if not run.cfg.checkpoint.export_hf:
        return None
    out = run.run_dir / "hf"
    modules = [getattr(c, "module", c) for c in run.trainer.model_chunks]
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    save_hf_folder(modules, run.hf, out, run.ctx,
                   torch_dtype=dtype[modules[0].config.params_dtype])  # fmt: skip
    if run.ctx.is_driver:
        run.tokenizer.save_pretrained(str(out))
    return out
