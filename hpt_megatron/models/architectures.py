"""Supported Hugging Face architectures and the features each one switches on.

Adding a dense decoder that differs only in these switches is one entry here; adding a new kind of
block (experts, latent attention) also needs rules in :mod:`hpt_megatron.models.mapping`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpt_megatron.config.base import ConfigError


@dataclass(frozen=True)
class Architecture:
    """What distinguishes one HF decoder family on the Megatron side.

    Attributes:
        name: the family, for messages.
        qkv_bias_default: whether q/k/v projections carry a bias when the config does not say.
        qkv_bias_key: the config key that switches the q/k/v bias, or ``None`` when the modelling
            code ignores the config (Qwen2 always has the bias).
        qk_norm: RMSNorm on queries and keys per head (Qwen3).
    """

    name: str
    qkv_bias_default: bool
    qk_norm: bool
    qkv_bias_key: str | None = "attention_bias"

    def qkv_bias(self, hf: dict[str, Any]) -> bool:
        if self.qkv_bias_key is None:
            return self.qkv_bias_default
        return bool(hf.get(self.qkv_bias_key, self.qkv_bias_default))


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(name="llama", qkv_bias_default=False, qk_norm=False),
    "qwen2": Architecture(name="qwen2", qkv_bias_default=True, qk_norm=False, qkv_bias_key=None),
    "qwen3": Architecture(name="qwen3", qkv_bias_default=False, qk_norm=True),
}


def architecture_of(hf: dict[str, Any]) -> Architecture:
    """The :class:`Architecture` for an HF config, or a ``ConfigError`` naming ``model_type``."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"config.json: model_type={model_type!r} is not supported; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]
