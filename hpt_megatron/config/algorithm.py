"""The ``algorithm`` section: a preset name plus part-by-part overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class AlgorithmConfig:
    preset: str = "hpt"
    options: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
