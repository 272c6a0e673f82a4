"""The policy's Hugging Face ``config.json``, parsed once into a typed, frozen object.

:class:`HFModelConfig` is *Hugging Face's* description of the model: its fields carry HF's names
and HF's defaults (what transformers' ``LlamaConfig`` / ``Qwen2Config`` / ``Qwen3Config`` would
compute from the same file). What Megatron builds from it (``TransformerConfig``, the padded
vocabulary, the RoPE arguments of ``GPTModel``) lives in :mod:`hpt_megatron.models.provider`.
The file's own fields stay available, read-only, as :attr:`HFModelConfig.raw`, for writing
``config.json`` back next to exported weights and for building a transformers config.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from hpt_megatron.config.base import ConfigError
from hpt_megatron.models.architectures import Architecture, architecture_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_REQUIRED = object()
_DEFAULT_ROPE_THETA = 10000.0  # every supported family's HF default


@dataclass(frozen=True, kw_only=True)
class HFModelConfig:
    """An HF decoder ``config.json``: the fields this package reads, under HF's names.

    Build it with :meth:`from_dict` or :func:`hpt_megatron.models.provider.load_hf_config`;
    change it with ``dataclasses.replace`` *and* an updated ``raw`` (as
    :func:`~hpt_megatron.models.provider.hf_config_with_overrides` does), so that what is
    written back matches what was trained.

    Attributes:
        source: where it was read from (the file, or ``config.json`` for inline fields), for
            messages.
        head_dim: the file's ``head_dim``, else the family's HF default, else
            ``hidden_size // num_attention_heads``.
        num_key_value_heads: the file's, else the family's HF default (Qwen's 32) or
            ``num_attention_heads`` (no grouping); it must divide ``num_attention_heads``.
        rope_theta: RoPE base, from ``rope_theta`` (transformers 4) or
            ``rope_parameters.rope_theta`` (transformers 5).
        rope_scaling: the scaling parameters (``rope_type``, ``factor``, ...), ``None`` for plain
            RoPE; which ones Megatron can match is :func:`~provider.rope_settings`'s business.
        attention_bias: whether the q/k/v projections carry a bias (the file's
            ``attention_bias``, or the family's fixed choice: Qwen2 always has one).
        torch_dtype: ``torch_dtype`` (transformers 4) or ``dtype`` (transformers 5), if given.
        num_experts: routed experts per sparse layer (``num_experts``, or transformers 5's
            ``num_local_experts``); 0 for dense families.
        num_experts_per_tok: the router's top-k (0 for dense families).
        moe_intermediate_size: each expert's FFN size (0 for dense families).
        norm_topk_prob: whether the top-k router probabilities are renormalised to sum to 1.
        decoder_sparse_step / mlp_only_layers: HF's rule for which layers are sparse
            (:attr:`moe_layers`).
        raw: every field of the file, read-only; :meth:`to_dict` gives a mutable copy.
    """

    source: str
    model_type: str
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    hidden_act: str
    mlp_bias: bool
    use_sliding_window: bool
    initializer_range: float
    torch_dtype: str | None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    raw: Mapping[str, Any] = field(repr=False)

    @property
    def architecture(self) -> Architecture:
        return architecture_of(self.model_type, self.source)

    @property
    def qk_norm(self) -> bool:
        """RMSNorm on queries and keys per head: fixed by the family (Qwen3), no config key."""
        return self.architecture.qk_norm

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """Per layer: does it have experts (HF's rule: not in ``mlp_only_layers`` and every
        ``decoder_sparse_step``-th layer)?"""
        return tuple(
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_hidden_layers)
        )

    def to_dict(self) -> dict[str, Any]:
        """A mutable deep copy of the file's fields (what ``config.json`` would hold)."""
        return copy.deepcopy(dict(self.raw))

    def to_transformers(self) -> PretrainedConfig:
        """The transformers config of the same model (``AutoConfig.for_model``)."""
        from transformers import AutoConfig

        fields = {k: v for k, v in self.to_dict().items() if k != "architectures"}
        return AutoConfig.for_model(**fields)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> HFModelConfig:
        """Parse ``config.json`` fields (copied; ``raw`` is not kept).

        Raises:
            ConfigError: (a ``ValueError``) naming ``source`` and the key: a missing size, a
                value of the wrong type, or an unsupported ``model_type``.
        """
        fields = copy.deepcopy(dict(raw))
        get = _Reader(fields, source)
        arch = architecture_of(fields.get("model_type"), source)
        heads = get.integer("num_attention_heads")
        hidden = get.integer("hidden_size")
        theta, scaling = _rope(get)
        kv_heads = get.integer("num_key_value_heads", _kv_default(fields, arch, heads))
        if kv_heads < 1 or heads % kv_heads:
            raise ConfigError(
                f"{source}: num_key_value_heads={kv_heads} does not divide "
                f"num_attention_heads={heads}"
                + ("" if "num_key_value_heads" in fields else f" ({arch.name}'s default)")
            )
        qkv_bias = arch.qkv_bias_default
        if arch.qkv_bias_key is not None:
            qkv_bias = get.flag(arch.qkv_bias_key, arch.qkv_bias_default)
        dtype = get.text("torch_dtype", None) or get.text("dtype", None)
        architectures = get.value("architectures", [], (list,))
        moe = _moe_fields(get, arch, get.integer("num_hidden_layers")) if arch.moe else {}
        return cls(
            source=source,
            model_type=arch.name,
            architectures=tuple(str(a) for a in architectures),
            vocab_size=get.integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get.integer("intermediate_size"),
            num_hidden_layers=get.integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=get.integer("head_dim", arch.head_dim or hidden // heads),
            max_position_embeddings=get.integer(
                "max_position_embeddings", arch.max_position_embeddings
            ),
            rms_norm_eps=get.number("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=get.flag("tie_word_embeddings", False),
            attention_bias=qkv_bias,
            hidden_act=get.text("hidden_act", "silu"),
            mlp_bias=get.flag("mlp_bias", False),
            use_sliding_window=get.flag("use_sliding_window", False),
            initializer_range=get.number("initializer_range", 0.02),
            torch_dtype=dtype,
            raw=MappingProxyType(fields),
            **moe,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> HFModelConfig:
        """Parse a ``config.json``, or the one in the folder ``path``.

        Raises:
            ValueError: no ``config.json``, invalid JSON, or as :meth:`from_dict`.
        """
        path = Path(path)
        if not path.exists():
            raise ValueError(f"{path} does not exist (no Hugging Face config.json to read)")
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{path}: no Hugging Face config.json here")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))


class _Reader:
    """Typed reads of ``config.json`` keys; ``null`` counts as absent (HF treats it so)."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def value(self, key: str, default: Any, types: tuple[type, ...]) -> Any:
        value = self.raw.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: missing {key}")
            return default
        # bool is an int subclass: "vocab_size": true is an error, not 1.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{self.source}: {key}={value!r} is not a {names}")
        return value

    def integer(self, key: str, default: Any = _REQUIRED) -> int:
        return int(self.value(key, default, (int,)))

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        return float(self.value(key, default, (int, float)))

    def flag(self, key: str, default: Any = _REQUIRED) -> bool:
        return bool(self.value(key, default, (bool,)))

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        return self.value(key, default, (str,))


def _moe_fields(get: _Reader, arch: Architecture, layers: int) -> dict[str, Any]:
    """The expert fields of a mixture-of-experts family; ``ConfigError`` naming the key for
    variants not built (:attr:`MoEFamily.unsupported`) and for sizes that do not fit."""
    family = arch.moe
    assert family is not None
    for key, accepted, feature in family.unsupported:
        if key in get.raw and get.raw[key] not in accepted:
            raise ConfigError(
                f"{get.source}: {key}={get.raw[key]!r} asks for {feature}, which {arch.name} "
                f"models here do not support"
            )
    count_key = next((k for k in family.num_experts_keys if get.raw.get(k) is not None), None)
    experts = get.integer(count_key) if count_key else family.num_experts
    top_k = get.integer("num_experts_per_tok", family.top_k)
    step = get.integer("decoder_sparse_step", 1)
    dense = get.value("mlp_only_layers", [], (list,))
    if experts < 1:
        raise ConfigError(f"{get.source}: {count_key or 'num_experts'}={experts} must be >= 1")
    if not 1 <= top_k <= experts:
        raise ConfigError(
            f"{get.source}: num_experts_per_tok={top_k} must be in [1, {experts}] (num_experts)"
        )
    if step < 1:
        raise ConfigError(f"{get.source}: decoder_sparse_step={step} must be >= 1")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in dense):
        raise ConfigError(
            f"{get.source}: mlp_only_layers={dense!r} must list layer indices in [0, {layers})"
        )
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": get.integer("moe_intermediate_size", family.moe_intermediate_size),
        "norm_topk_prob": get.flag("norm_topk_prob", family.norm_topk_prob),
        "decoder_sparse_step": step,
        "mlp_only_layers": tuple(sorted(dense)),
    }


def _kv_default(fields: dict[str, Any], arch: Architecture, heads: int) -> int:
    # HF's config classes: an absent key takes the class default, an explicit null means MHA.
    if "num_key_value_heads" in fields or arch.num_key_value_heads is None:
        return heads
    return arch.num_key_value_heads


def _rope(get: _Reader) -> tuple[float, Mapping[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from transformers 4 keys (``rope_theta``, ``rope_scaling``)
    or transformers 5's ``rope_parameters``; the scaling without the base, ``None`` if plain."""
    params = get.value("rope_parameters", {}, (dict,))
    scaling = get.value("rope_scaling", None, (dict,)) or params
    theta = get.number("rope_theta", params.get("rope_theta", _DEFAULT_ROPE_THETA))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    return theta, MappingProxyType({k: v for k, v in scaling.items() if k != "rope_theta"})


def parameter_count(hf: HFModelConfig, vocab: int | None = None) -> int:
    """Parameters of the decoder ``hf`` describes (gated MLPs, as every supported family).

    Per layer: attention ``H*(nh + 2*nkv)*hd + nh*hd*H`` (+ q/k/v biases, + q/k norms), two
    RMSNorms ``2*H``, and either a dense MLP ``3*H*I`` or ``E`` experts ``E*3*H*I_moe`` with a
    router ``H*E``; then embeddings ``V*H``, an untied output layer ``V*H`` and the final norm.
    ``vocab`` replaces ``hf.vocab_size`` (Megatron's padded vocabulary).
    """
    h, hd = hf.hidden_size, hf.head_dim
    nh, nkv = hf.num_attention_heads, hf.num_key_value_heads
    attention = h * (nh + 2 * nkv) * hd + nh * hd * h
    if hf.attention_bias:
        attention += (nh + 2 * nkv) * hd
    if hf.qk_norm:
        attention += 2 * hd
    dense = 3 * h * hf.intermediate_size + (2 * hf.intermediate_size + h if hf.mlp_bias else 0)
    sparse = hf.num_experts * 3 * h * hf.moe_intermediate_size + h * hf.num_experts
    layers = sum(attention + 2 * h + (sparse if s else dense) for s in hf.moe_layers)
    v = hf.vocab_size if vocab is None else vocab
    return layers + v * h * (1 if hf.tie_word_embeddings else 2) + h
