"""Hugging Face ``config.json`` -> Megatron ``TransformerConfig`` and ``GPTModel``.

Dense decoders only (Llama 3.x, Qwen2/2.5, Qwen3): RMSNorm, SwiGLU, RoPE (default or ``llama3``
scaling), grouped-query attention, optional q/k/v bias and QK norm, tied or untied embeddings.
Local (pure torch) layers on CPU or when ``model.transformer_impl == "local"``; Transformer Engine
layers otherwise. The input is Hugging Face's view of the model (:class:`HFModelConfig`, HF
names); the output is Megatron's (``TransformerConfig``, padded vocabulary, ``GPTModel``).
``transformer_config_from_hf`` is pure: it reads dataclasses only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from hpt_megatron.config.base import ConfigError
from hpt_megatron.config.sections import ModelConfig, ParallelConfig
from hpt_megatron.models.hf_config import HFModelConfig

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Megatron's llama3 RoPE scaling hard-codes these; other values would silently differ from HF.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA3_ORIGINAL_MAX = 8192


@dataclass(frozen=True)
class RopeSettings:
    """RoPE as Megatron's GPTModel takes it."""

    theta: float
    llama3_scaling: bool = False
    scaling_factor: float = 8.0


def load_hf_config(path_or_dict: str | Path | Mapping[str, Any]) -> HFModelConfig:
    """Parse an HF config: a folder holding ``config.json``, the file itself, or its fields
    (``model.inline``; copied).

    Raises:
        ValueError: the path has no ``config.json``, the file is not valid JSON, or a field is
            missing or of the wrong type (the message names the file and the key).
    """
    if isinstance(path_or_dict, Mapping):
        return HFModelConfig.from_dict(path_or_dict)
    return HFModelConfig.from_file(path_or_dict)


def hf_config_with_overrides(hf: HFModelConfig, model: ModelConfig) -> HFModelConfig:
    """The HF config with ``model.rope_theta`` / ``model.max_position_embeddings`` applied, to
    the fields and to ``raw`` alike.

    Written next to exported weights, so that the rollout servers use the same RoPE as training.
    """
    raw = hf.to_dict()
    changes: dict[str, Any] = {}
    if model.max_position_embeddings is not None:
        raw["max_position_embeddings"] = model.max_position_embeddings
        changes["max_position_embeddings"] = model.max_position_embeddings
    if model.rope_theta is not None:
        raw["rope_theta"] = model.rope_theta
        if isinstance(raw.get("rope_parameters"), dict):
            raw["rope_parameters"]["rope_theta"] = model.rope_theta
        changes["rope_theta"] = float(model.rope_theta)
    if not changes:
        return hf
    return dataclasses.replace(hf, raw=MappingProxyType(raw), **changes)


def rope_settings(hf: HFModelConfig) -> RopeSettings:
    """Megatron's RoPE arguments for the HF RoPE; ``ConfigError`` for scalings Megatron lacks."""
    scaling = hf.rope_scaling
    if scaling is None:
        return RopeSettings(theta=hf.rope_theta)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ConfigError(f"{hf.source}: rope type {kind!r} is not supported (default, llama3)")
    for key, expected in _LLAMA3_FIXED.items():
        if float(scaling.get(key, expected)) != expected:
            raise ConfigError(
                f"{hf.source}: llama3 rope {key}={scaling[key]} (Megatron fixes it at {expected})"
            )
    if int(scaling.get("original_max_position_embeddings", 8192)) != _LLAMA3_ORIGINAL_MAX:
        raise ConfigError(f"{hf.source}: llama3 rope original_max_position_embeddings must be 8192")
    if "factor" not in scaling:
        raise ConfigError(f"{hf.source}: llama3 rope scaling without a factor")
    return RopeSettings(
        theta=hf.rope_theta, llama3_scaling=True, scaling_factor=float(scaling["factor"])
    )


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's vocabulary: HF's ``vocab_size`` rounded up to a multiple of
    ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_hf_supported(hf: HFModelConfig) -> None:
    """Raise ``ConfigError`` naming the key for HF features the Megatron model would not match.

    (The sizes and ``model_type`` were checked when the config was parsed.)
    """
    if hf.hidden_act != "silu":
        raise ConfigError(f"{hf.source}: hidden_act={hf.hidden_act!r} (only silu/SwiGLU)")
    if hf.mlp_bias:
        raise ConfigError(f"{hf.source}: mlp_bias=true is not supported")
    if hf.use_sliding_window:
        raise ConfigError(f"{hf.source}: use_sliding_window=true is not supported")
    rope_settings(hf)


def check_parallel_against_model(hf: HFModelConfig, parallel: ParallelConfig) -> None:
    """Raise ``ConfigError`` when the TP/PP layout cannot split this model.

    TP ranks must hold whole KV groups (docs/architecture.md, Contracts), so TP divides both the
    query heads and the KV heads; PP (times virtual stages) must divide the layers.
    """
    heads, groups = hf.num_attention_heads, hf.num_key_value_heads
    if heads % parallel.tp or groups % parallel.tp:
        raise ConfigError(
            f"parallel.tp={parallel.tp} does not divide num_attention_heads={heads} / "
            f"num_key_value_heads={groups}: each TP rank must hold whole KV groups"
        )
    if hf.intermediate_size % parallel.tp:
        raise ConfigError(
            f"parallel.tp={parallel.tp} does not divide intermediate_size={hf.intermediate_size}"
        )
    layers, stages = hf.num_hidden_layers, parallel.pp * (parallel.vpp or 1)
    if layers % stages:
        raise ConfigError(
            f"parallel.pp={parallel.pp} (x vpp={parallel.vpp or 1}) does not divide "
            f"num_hidden_layers={layers}"
        )


def _fusions(use_te: bool) -> dict[str, bool]:
    # The fused kernels need CUDA (and some need TE); the local CPU path uses plain torch ops.
    return {
        "bias_activation_fusion": use_te,
        "masked_softmax_fusion": use_te,
        "bias_dropout_fusion": use_te,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": use_te,
    }


def _precision(model: ModelConfig, parallel: ParallelConfig) -> dict[str, Any]:
    dtype = _DTYPES[model.params_dtype]
    out: dict[str, Any] = {
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "pipeline_dtype": dtype if parallel.pp > 1 else None,
    }
    if model.fp8 is not None:
        out.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe)
        if model.fp8_recipe == "delayed":
            out.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return out


def _recompute(model: ModelConfig) -> dict[str, Any]:
    if model.recompute_granularity is None:
        return {}
    out: dict[str, Any] = {"recompute_granularity": model.recompute_granularity}
    if model.recompute_granularity == "full":
        out["recompute_method"] = model.recompute_method
        out["recompute_num_layers"] = model.recompute_num_layers or 1
    return out


def transformer_config_from_hf(
    hf: HFModelConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    use_te: bool,
    cpu_initialization: bool | None = None,
) -> TransformerConfig:
    """Translate an HF config (plus our model and parallel sections) into a ``TransformerConfig``.

    Args:
        hf: the HF ``config.json``.
        model: dtype, FP8, recompute and dropout options (RoPE overrides are read by
            :func:`build_model`, which owns the GPTModel arguments).
        parallel: TP/PP/VPP/CP sizes and sequence parallelism.
        use_te: whether the layers are Transformer Engine's (turns on fused kernels).
        cpu_initialization: create parameters on the CPU; defaults to "no GPU visible".

    Raises:
        ConfigError: unsupported architecture or feature, or a layout that cannot split the model.
    """
    from megatron.core.transformer import TransformerConfig

    check_hf_supported(hf)
    check_parallel_against_model(hf, parallel)
    if model.fp8 is not None and not use_te:
        raise ConfigError("model.fp8: FP8 needs Transformer Engine layers (a GPU)")
    if cpu_initialization is None:
        cpu_initialization = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=hf.attention_bias,
        qk_layernorm=hf.qk_norm,
        init_method_std=hf.initializer_range,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=cpu_initialization,
        **_precision(model, parallel),
        **_recompute(model),
        **_fusions(use_te),
    )


def use_transformer_engine(model: ModelConfig) -> bool:
    """TE layers unless asked for local ones or no GPU is visible (TE cannot import without)."""
    if model.transformer_impl == "local":
        return False
    if model.transformer_impl == "transformer_engine" and not torch.cuda.is_available():
        raise ConfigError("model.transformer_impl: transformer_engine needs a GPU; use local/auto")
    return torch.cuda.is_available()


def layer_spec(config: TransformerConfig, *, use_te: bool) -> Any:
    """The GPT layer ``ModuleSpec``: TE-fused norms+linears, or Megatron's local modules."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=config.qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        normalization="RMSNorm", qk_layernorm=config.qk_layernorm
    )


def build_model(
    hf: HFModelConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
    init_weights: bool = True,
    meta: bool = False,
) -> GPTModel:
    """Build this rank's Megatron ``GPTModel`` (one pipeline stage, one virtual chunk).

    Needs Megatron's parallel state (``hpt_megatron.parallel.runtime.init_distributed``). The
    weights are randomly initialised; load them with :mod:`hpt_megatron.models.loading` or from
    a distributed checkpoint. ``init_weights=False`` skips the random initialisation.
    ``meta=True`` builds the local-layer model on the ``meta`` device, on any machine (shapes and
    checkpoint layout only, no memory; the converter's schema).
    """
    from megatron.core.models.gpt import GPTModel

    hf = hf_config_with_overrides(hf, model)
    use_te = False if meta else use_transformer_engine(model)
    if parallel.sequence_parallel and not use_te:
        raise ConfigError(
            "parallel.sequence_parallel: Megatron's local (CPU) layers do not support sequence "
            "parallelism (its torch norm refuses it); use Transformer Engine layers on GPUs"
        )
    # On meta, nothing may ask for a CUDA device: Megatron's CPU initialisation path allocates
    # without one, so the meta device context applies.
    cpu_init = True if meta else None
    config = transformer_config_from_hf(
        hf, model, parallel, use_te=use_te, cpu_initialization=cpu_init
    )
    config.perform_initialization = init_weights
    rope = rope_settings(hf)
    with torch.device("meta") if meta else contextlib.nullcontext():
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, use_te=use_te),
            vocab_size=padded_vocab_size(
                hf.vocab_size, parallel.tp, model.make_vocab_size_divisible_by
            ),
            max_sequence_length=hf.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=hf.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=rope.theta,  # type: ignore[arg-type]  # float bases are fine
            rope_scaling=rope.llama3_scaling,
            rope_scaling_factor=rope.scaling_factor,
            vp_stage=vp_stage,
        )
    if torch.cuda.is_available() and not meta:
        gpt.cuda(torch.cuda.current_device())
    return gpt


def build_model_chunks(
    hf: HFModelConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pp_rank: int,
    init_weights: bool = True,
    meta: bool = False,
) -> list[GPTModel]:
    """This pipeline rank's model chunks: one, or ``parallel.vpp`` with virtual stages.

    ``init_weights=False`` skips the random initialisation (weights about to be loaded);
    ``meta`` as in :func:`build_model`.
    """
    vpp = parallel.vpp or 1
    first, last = pp_rank == 0, pp_rank == parallel.pp - 1
    return [
        build_model(
            hf,
            model,
            parallel,
            pre_process=first and i == 0,
            post_process=last and i == vpp - 1,
            vp_stage=i if parallel.vpp else None,
            init_weights=init_weights,
            meta=meta,
        )
        for i in range(vpp)
    ]
