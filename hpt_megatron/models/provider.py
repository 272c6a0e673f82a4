"""Hugging Face ``config.json`` -> Megatron ``TransformerConfig`` and ``GPTModel``.

Dense decoders only (Llama 3.x, Qwen2/2.5, Qwen3): RMSNorm, SwiGLU, RoPE (default or ``llama3``
scaling), grouped-query attention, optional q/k/v bias and QK norm, tied or untied embeddings.
Local (pure torch) layers on CPU or when ``model.transformer_impl == "local"``; Transformer Engine
layers otherwise. ``transformer_config_from_hf`` is pure: it reads dicts and dataclasses only.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hpt_megatron.config.base import ConfigError
from hpt_megatron.config.sections import ModelConfig, ParallelConfig
from hpt_megatron.models.architectures import architecture_of

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


def load_hf_config(path_or_dict: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Read an HF config: a folder holding ``config.json``, the file itself, or a dict (copied).

    Raises:
        ValueError: the path has no ``config.json`` or the file is not valid JSON.
    """
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no Hugging Face config.json here")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def hf_config_with_overrides(hf: dict[str, Any], model: ModelConfig) -> dict[str, Any]:
    """The HF config with ``model.rope_theta`` / ``model.max_position_embeddings`` applied.

    Written next to exported weights, so that the rollout servers use the same RoPE as training.
    """
    out = copy.deepcopy(hf)
    if model.max_position_embeddings is not None:
        out["max_position_embeddings"] = model.max_position_embeddings
    if model.rope_theta is not None:
        out["rope_theta"] = model.rope_theta
        if isinstance(out.get("rope_parameters"), dict):
            out["rope_parameters"]["rope_theta"] = model.rope_theta
    return out


def rope_settings(hf: dict[str, Any]) -> RopeSettings:
    """RoPE base and scaling from either transformers 4 (``rope_theta``, ``rope_scaling``) or
    transformers 5 (``rope_parameters``) keys; ``ConfigError`` for scalings Megatron lacks."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return RopeSettings(theta=theta)
    if kind != "llama3":
        raise ConfigError(f"config.json: rope type {kind!r} is not supported (default, llama3)")
    for key, expected in _LLAMA3_FIXED.items():
        if float(scaling.get(key, expected)) != expected:
            raise ConfigError(
                f"config.json: llama3 rope {key}={scaling[key]} (Megatron fixes it at {expected})"
            )
    if int(scaling.get("original_max_position_embeddings", 8192)) != _LLAMA3_ORIGINAL_MAX:
        raise ConfigError("config.json: llama3 rope original_max_position_embeddings must be 8192")
    return RopeSettings(theta=theta, llama3_scaling=True, scaling_factor=float(scaling["factor"]))


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Round the vocabulary up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def head_dim(hf: dict[str, Any]) -> int:
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def num_kv_heads(hf: dict[str, Any]) -> int:
    return int(hf.get("num_key_value_heads") or hf["num_attention_heads"])


def check_hf_supported(hf: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming the key for HF features the Megatron model would not match."""
    architecture_of(hf)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise ConfigError(f"config.json: missing {key}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act={hf['hidden_act']!r} (only silu/SwiGLU)")
    if hf.get("mlp_bias"):
        raise ConfigError("config.json: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window=true is not supported")
    rope_settings(hf)


def check_parallel_against_model(hf: dict[str, Any], parallel: ParallelConfig) -> None:
    """Raise ``ConfigError`` when the TP/PP layout cannot split this model.

    TP ranks must hold whole KV groups (DESIGN.md section 4), so TP divides both the query heads
    and the KV heads; PP (times virtual stages) must divide the layers.
    """
    heads, groups = int(hf["num_attention_heads"]), num_kv_heads(hf)
    if heads % parallel.tp or groups % parallel.tp:
        raise ConfigError(
            f"parallel.tp={parallel.tp} does not divide num_attention_heads={heads} / "
            f"num_key_value_heads={groups}: each TP rank must hold whole KV groups"
        )
    if int(hf["intermediate_size"]) % parallel.tp:
        raise ConfigError(
            f"parallel.tp={parallel.tp} does not divide intermediate_size={hf['intermediate_size']}"
        )
    layers, stages = int(hf["num_hidden_layers"]), parallel.pp * (parallel.vpp or 1)
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
    hf: dict[str, Any],
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    use_te: bool,
    cpu_initialization: bool | None = None,
) -> TransformerConfig:
    """Translate an HF config (plus our model and parallel sections) into a ``TransformerConfig``.

    Args:
        hf: the HF ``config.json`` fields.
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
    arch = architecture_of(hf)
    if cpu_initialization is None:
        cpu_initialization = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=int(hf["num_attention_heads"]),
        num_query_groups=num_kv_heads(hf),
        kv_channels=head_dim(hf),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias(hf),
        qk_layernorm=arch.qk_norm,
        init_method_std=float(hf.get("initializer_range", 0.02)),
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
    hf: dict[str, Any],
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
                int(hf["vocab_size"]), parallel.tp, model.make_vocab_size_divisible_by
            ),
            max_sequence_length=int(hf.get("max_position_embeddings", 4096)),
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
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
    hf: dict[str, Any],
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
