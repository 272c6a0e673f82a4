"""Hugging Face ``config.json`` -> Megatron ``TransformerConfig`` and ``GPTModel``.

Llama 3.x, Qwen2/2.5, Qwen3 and Qwen3-MoE: RMSNorm, SwiGLU, RoPE (default or ``llama3``
scaling), grouped-query attention, optional q/k/v bias and QK norm, tied or untied embeddings;
mixture-of-experts layers (top-k softmax router in fp32, alltoall token dispatcher, experts split
over ``parallel.ep`` ranks and ``parallel.etp`` ranks) where HF's ``mlp_only_layers`` /
``decoder_sparse_step`` put them. Experts are Megatron's SequentialMLP of local layers on CPU and
grouped-GEMM TE experts on GPU (the GPU spec is Megatron's; not exercised by this package's tests).
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
    if hf.is_moe and not any(hf.moe_layers):
        raise ConfigError(
            f"{hf.source}: no layer has experts (mlp_only_layers={list(hf.mlp_only_layers)}, "
            f"decoder_sparse_step={hf.decoder_sparse_step}); use the dense family instead"
        )
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
    check_experts_against_model(hf, parallel)
    layers, stages = hf.num_hidden_layers, parallel.pp * (parallel.vpp or 1)
    if layers % stages:
        raise ConfigError(
            f"parallel.pp={parallel.pp} (x vpp={parallel.vpp or 1}) does not divide "
            f"num_hidden_layers={layers}"
        )


def check_experts_against_model(hf: HFModelConfig, parallel: ParallelConfig) -> None:
    """Raise ``ConfigError`` when the expert layout (``parallel.ep`` / ``parallel.etp``) cannot
    split this model: EP ranks hold whole experts, ETP ranks whole slices of each."""
    if not hf.is_moe:
        if parallel.ep > 1 or parallel.expert_tp != parallel.tp:
            raise ConfigError(
                f"parallel.ep={parallel.ep} / parallel.etp={parallel.etp}: {hf.source} is a dense "
                f"model ({hf.model_type}) without experts"
            )
        return
    if hf.num_experts % parallel.ep:
        raise ConfigError(
            f"parallel.ep={parallel.ep} does not divide num_experts={hf.num_experts}: each "
            f"expert-parallel rank must hold whole experts"
        )
    if hf.moe_intermediate_size % parallel.expert_tp:
        raise ConfigError(
            f"parallel.etp={parallel.expert_tp} does not divide "
            f"moe_intermediate_size={hf.moe_intermediate_size}"
        )


def _experts(hf: HFModelConfig, model: ModelConfig, parallel: ParallelConfig, use_te: bool):
    """The ``TransformerConfig`` fields of the expert layers (none for dense models).

    HF's Qwen3-MoE router: softmax over all experts, top-k, then (``norm_topk_prob``) the k
    probabilities renormalised, which is a softmax over the k top logits: Megatron's router
    without ``moe_router_pre_softmax``; without renormalisation it is the pre-softmax router.
    """
    if not hf.is_moe:
        return {}
    aux, z = model.moe_aux_loss_coeff, model.moe_z_loss_coeff
    return {
        "num_moe_experts": hf.num_experts,
        "moe_ffn_hidden_size": hf.moe_intermediate_size,
        "moe_router_topk": hf.num_experts_per_tok,
        "moe_router_pre_softmax": not hf.norm_topk_prob,
        "moe_layer_freq": [int(sparse) for sparse in hf.moe_layers],
        "moe_token_dispatcher_type": "alltoall",
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "aux_loss" if aux > 0 else "none",
        "moe_aux_loss_coeff": aux,
        "moe_z_loss_coeff": z if z > 0 else None,
        "moe_grouped_gemm": use_te,
        "moe_permute_fusion": False,
        "expert_model_parallel_size": parallel.ep,
        "expert_tensor_parallel_size": parallel.expert_tp,
    }


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


def _pipeline(parallel: ParallelConfig) -> dict[str, Any]:
    """Pipeline point-to-point settings.

    Micro-batches are token-budgeted, so their shapes differ and each transfer first exchanges
    its shape (``variable_seq_lengths``). Under a virtual pipeline with PP=2 a rank's previous and
    next stage are the same peer, and Megatron's batched exchange posts the sends and receives of
    both directions to it in one fixed order: the two directions cross (Megatron-LM issues #1450
    and #5100). Overlapped, unbatched p2p sends forward and backward traffic in separate calls, as
    verl configures it.
    """
    if parallel.vpp is None:
        return {}
    return {"overlap_p2p_comm": True, "batch_p2p_comm": False}


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
    config = TransformerConfig(
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
        **_experts(hf, model, parallel, use_te),
        **_recompute(model),
        **_fusions(use_te),
        **_pipeline(parallel),
    )
    # Set after construction: the check in TransformerConfig's __post_init__ refuses it with the
    # allgather dispatcher of its dense default, which no dense layer uses (MoE uses alltoall).
    config.variable_seq_lengths = True
    return config


def use_transformer_engine(model: ModelConfig) -> bool:
    """TE layers unless asked for local ones or no GPU is visible (TE cannot import without)."""
    if model.transformer_impl == "local":
        return False
    if model.transformer_impl == "transformer_engine" and not torch.cuda.is_available():
        raise ConfigError("model.transformer_impl: transformer_engine needs a GPU; use local/auto")
    return torch.cuda.is_available()


def layer_spec(config: TransformerConfig, *, use_te: bool, vp_stage: int | None = None) -> Any:
    """The GPT layer ``ModuleSpec``: TE-fused norms+linears, or Megatron's local modules; for
    mixture-of-experts models the block spec of this stage's dense and expert layers."""
    from megatron.core.models.gpt import gpt_layer_specs

    if config.num_moe_experts:
        return gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage
        )
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
            transformer_layer_spec=layer_spec(config, use_te=use_te, vp_stage=vp_stage),
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
    if not init_weights:
        mark_tensor_parallel_weights(gpt)
    if torch.cuda.is_available() and not meta:
        gpt.cuda(torch.cuda.current_device())
    return gpt


def mark_tensor_parallel_weights(module: torch.nn.Module) -> int:
    """Give the weights of Megatron's tensor-parallel layers their TP attributes; returns how
    many were missing them.

    Megatron sets ``tensor_model_parallel`` / ``partition_dim`` inside its weight initialisers,
    so with ``perform_initialization=False`` (weights about to be loaded) a sharded weight looks
    like a TP duplicate: the gradient norm, and with it clipping, counts it on TP rank 0 only.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    dims = ((RowParallelLinear, 1), (ColumnParallelLinear, 0), (VocabParallelEmbedding, 0))
    marked = 0
    for sub in module.modules():
        dim = next((d for cls, d in dims if isinstance(sub, cls)), None)
        weight = getattr(sub, "weight", None)
        if dim is None or not isinstance(weight, torch.nn.Parameter):
            continue
        if not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
            marked += 1
    return marked


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
