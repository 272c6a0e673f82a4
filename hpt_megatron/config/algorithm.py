"""The ``algorithm`` section: a preset name plus part-by-part overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpt_megatron.algorithms.spec import AlgorithmSpec


@dataclass(kw_only=True)
class AlgorithmConfig:
    """``preset`` names an entry of ``hpt_megatron.algorithms.PRESETS``; ``options`` override its
    fields by name (``algorithm.options.clip_high=0.28``). See docs/algorithms.md."""

    preset: str = "hpt"
    options: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields

    def spec(self) -> AlgorithmSpec:
        """The resolved, validated spec (raises ``ValueError`` naming the bad key)."""
        from hpt_megatron.algorithms.presets import get_preset
        from hpt_megatron.algorithms.spec import OptionError

        try:
            base = get_preset(self.preset)
        except ValueError as err:
            raise ValueError(f"preset: {err}") from None
        try:
            spec = base.with_options(**self.options)
            spec.validate()
        except OptionError as err:
            raise ValueError(f"options.{err.key}: {err.detail}") from None
        return spec

    def validate(self) -> None:
        self.spec()
