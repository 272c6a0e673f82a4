"""Build the configured rollout engine (``rollout.engine``) for the scheduler."""

from __future__ import annotations

from pathlib import Path

from hpt_megatron.config.rollout import RolloutConfig
from hpt_megatron.rollout.base import RolloutEngine, SamplingParams


def build_engine(
    cfg: RolloutConfig, *, model_path: str | Path, run_dir: str | Path
) -> RolloutEngine:
    """The CPU engine in this process, or SGLang servers started on ``model_path``.

    SGLang's weight sync is by disk snapshots here; a trainer that owns GPU tensors or an NCCL
    group builds ``SGLangEngine.launch(..., transport=...)`` itself.
    """
    if cfg.engine == "cpu":
        from hpt_megatron.rollout.cpu_engine import HFCpuEngine

        return HFCpuEngine.from_pretrained(
            model_path, dtype=cfg.cpu.dtype, max_batch_rows=cfg.cpu.max_batch_rows
        )
    from hpt_megatron.rollout.sglang import SGLangEngine

    return SGLangEngine.launch(cfg.sglang, model_path=model_path, run_dir=run_dir)


def sampling_params(
    cfg: RolloutConfig, *, seed: int | None = None, **overrides: object
) -> SamplingParams:
    """``SamplingParams`` from the ``rollout`` section (``overrides`` win, e.g. for validation)."""
    params = SamplingParams(
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        stop_strings=list(cfg.stop),
        seed=seed,
    )
    for key, value in overrides.items():
        if not hasattr(params, key):
            raise ValueError(f"unknown sampling parameter {key!r}")
        setattr(params, key, value)
    return params
