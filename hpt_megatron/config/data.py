"""The ``data`` and ``reward`` sections."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class DataConfig:
    train: str = "arithmetic"  # a file (parquet/json/jsonl) or a built-in task name
    val: str | None = None
    prompts_per_step: int = 8
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 1024


@dataclass(kw_only=True)
class RewardConfig:
    fn: str = "math"  # a registered name or "package.module:function"
