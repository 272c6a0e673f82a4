"""Supported Hugging Face architectures: their ``config.json`` defaults and the features each one
switches on.

Adding a dense decoder that differs only in these switches is one entry here; adding a new kind of
block (latent attention) also needs rules in :mod:`hpt_megatron.models.mapping`.

Mixture-of-experts families carry a :class:`MoEFamily`: the HF config keys of their expert counts
and sizes, and the variant keys whose features the Megatron model does not build yet (shared
experts, sigmoid or grouped routers), each refused by name. Qwen2-MoE's shared expert or a
DeepSeek-style router is then a change of one entry (and its mapping rules), not of the code.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpt_megatron.config.base import ConfigError


@dataclass(frozen=True)
class MoEFamily:
    """The HF config keys of a mixture-of-experts family, with its HF defaults.

    Attributes:
        num_experts_keys: the expert-count keys, first match wins (transformers 5 writes
            ``num_local_experts`` for Qwen3-MoE's ``num_experts``).
        num_experts: HF's default expert count.
        top_k: HF's default ``num_experts_per_tok``.
        moe_intermediate_size: HF's default expert FFN size.
        norm_topk_prob: HF's default for renormalising the top-k router probabilities.
        unsupported: ``(key, accepted values, feature)``: a config whose ``key`` is present with a
            value outside ``accepted`` asks for a feature not built (a ``ConfigError`` naming
            the key).
    """

    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    num_experts: int = 128
    top_k: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    unsupported: tuple[tuple[str, tuple[object, ...], str], ...] = ()


# Variant switches of other MoE families; a Qwen3-MoE config carrying them is refused by name.
_MOE_VARIANTS: tuple[tuple[str, tuple[object, ...], str], ...] = (
    ("shared_expert_intermediate_size", (None, 0), "shared experts"),
    ("n_shared_experts", (None, 0), "shared experts"),
    ("scoring_func", (None, "softmax"), "a non-softmax (e.g. sigmoid) router"),
    ("topk_method", (None, "greedy"), "grouped top-k routing"),
    ("n_group", (None, 1), "grouped top-k routing"),
    ("topk_group", (None, 1), "grouped top-k routing"),
    ("first_k_dense_replace", (None, 0), "first_k_dense_replace (use mlp_only_layers)"),
)


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
        moe: the mixture-of-experts keys, ``None`` for dense families.
    """

    name: str
    qkv_bias_default: bool
    qk_norm: bool
    qkv_bias_key: str | None = "attention_bias"
    max_position_embeddings: int = 2048
    head_dim: int | None = None
    num_key_value_heads: int | None = None
    moe: MoEFamily | None = None


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
    "qwen3_moe": Architecture(
        name="qwen3_moe",
        qkv_bias_default=False,
        qk_norm=True,
        max_position_embeddings=32768,
        num_key_value_heads=4,
        moe=MoEFamily(unsupported=_MOE_VARIANTS),
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
