"""Supported Hugging Face architectures: their ``config.json`` defaults and the features each one
switches on.

Adding a dense decoder that differs only in these switches is one entry here; adding a new kind of
block (experts, latent attention) also needs rules in :mod:`hpt_megatron.models.mapping`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpt_megatron.config.base import ConfigError


@dataclass(frozen=True)
class Architecture:
    """What distinguishes one HF decoder family, with the defaults its HF config class applies
    when ``config.json`` omits a key (transformers' ``LlamaConfig``, ``Qwen2Config``, ...).

    Attributes:
        name: the family (HF's ``model_type``), for messages.
        qkv_bias_default: whether q/k/v projections carry a bias when the config does not say.
        qk_norm: RMSNorm on queries and keys per head (Qwen3).
        qkv_bias_key: the config key that switches the q/k/v bias, or ``None`` when the modelling
            code ignores the config (Qwen2 always has the bias).
        max_position_embeddings: HF's default ``max_position_embeddings``.
        head_dim: HF's default ``head_dim``; ``None``: ``hidden_size // num_attention_heads``.
        num_key_value_heads: HF's default when the key is absent; ``None`` (and, as in HF, an
            explicit ``null``): ``num_attention_heads``.
    """

    name: str
    qkv_bias_default: bool
    qk_norm: bool
    qkv_bias_key: str | None = "attention_bias"
    max_position_embeddings: int = 2048
    head_dim: int | None = None
    num_key_value_heads: int | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(name="llama", qkv_bias_default=False, qk_norm=False),
    "qwen2": Architecture(
        name="qwen2",
        qkv_bias_default=True,
        qk_norm=False,
        qkv_bias_key=None,
        max_position_embeddings=32768,
        num_key_value_heads=32,
    ),
    "qwen3": Architecture(
        name="qwen3",
        qkv_bias_default=False,
        qk_norm=True,
        max_position_embeddings=32768,
        head_dim=128,
        num_key_value_heads=32,
    ),
}


def architecture_of(model_type: object, source: str = "config.json") -> Architecture:
    """The :class:`Architecture` of an HF ``model_type``, or a ``ConfigError`` naming it."""
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not supported; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[str(model_type)]
