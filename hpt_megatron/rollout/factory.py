"""``SamplingParams`` from the ``rollout`` config section."""

from __future__ import annotations

from hpt_megatron.config.rollout import RolloutConfig
from hpt_megatron.rollout.base import SamplingParams


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
