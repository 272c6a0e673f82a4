"""The ``rollout`` section: engine choice and sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class RolloutConfig:
    engine: Literal["cpu", "sglang"] = "cpu"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
