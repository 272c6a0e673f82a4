"""Sizes a dry run can compute from the config and the model's ``config.json``: parameters,
checkpoint bytes and an estimate of the memory each GPU needs (pure functions, no torch).

The memory figure is an *estimate* for planning (is this layout anywhere near the card?), not a
measurement: allocator fragmentation, CUDA context (~0.5 GiB), NCCL buffers and the temporary
buffers of the loss are not in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hpt_megatron.config import HPTConfig
from hpt_megatron.models.hf_config import HFModelConfig, parameter_count

GIB = 1024**3

# Device memory (GiB) of common data-centre cards, by the name ``--gpu`` takes (lower case; the
# name nvidia-smi prints, e.g. "NVIDIA A100-SXM4-40GB", by the most specific key whose words
# are all in it).
GPU_MEMORY_GIB = {
    "a100-40gb": 40.0,
    "a100": 80.0,
    "a10": 24.0,
    "a10g": 24.0,
    "l4": 24.0,
    "l40s": 48.0,
    "v100": 32.0,
    "h100": 80.0,
    "h800": 80.0,
    "h20": 96.0,
    "h200": 141.0,
    "gh200": 96.0,
    "b200": 180.0,
    "mi300x": 192.0,
}

# SGLang's --mem-fraction-static when the config leaves it unset (it picks one by GPU size;
# about 0.88 on 80 GB cards): the estimate assumes this share.
SGLANG_DEFAULT_STATIC = 0.88

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def gpu_memory_gib(name: str) -> float | None:
    """GiB of device memory of a card named ``name`` (a key of :data:`GPU_MEMORY_GIB`, a name as
    nvidia-smi prints it, or a number of GiB), ``None`` if unknown."""
    try:
        return float(name)
    except ValueError:
        pass
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    hits = [k for k in GPU_MEMORY_GIB if words.issuperset(k.split("-"))]
    return GPU_MEMORY_GIB[max(hits, key=lambda k: k.count("-"))] if hits else None


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def checkpoint_bytes(params: int, params_dtype: str) -> int:
    """One Megatron checkpoint (``checkpoints/step_000004``): the weights in ``params_dtype``,
    plus Adam's two moments in fp32 and, when the weights are 16-bit, the fp32 master copy."""
    weight = _BYTES[params_dtype]
    return params * (weight + 8 + (4 if weight < 4 else 0))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, the model split evenly over the ``tp x pp`` ranks of a replica."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    sglang: int  # the colocated servers' static share (0 when they are elsewhere)
    sglang_released: bool  # --enable-memory-saver: the servers free it while the trainer runs

    @property
    def trainer_state(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        """Training (state + activations, + the servers' share unless released) or generation
        (state + the servers' share), whichever is larger."""
        held = 0 if self.sglang_released else self.sglang
        return self.trainer_state + max(self.activations + held, self.sglang)


def estimate_memory(
    cfg: HPTConfig, hf: HFModelConfig, dp: int, device_bytes: int | None
) -> MemoryEstimate:
    """Estimate the memory of one GPU of the run.

    With ``P`` the parameters (padded vocabulary), ``t, p`` the tensor and pipeline sizes, ``b``
    bytes per weight (2 for bf16/fp16, 4 for fp32), ``T`` the micro-batch token budget
    (``trainer.max_tokens_per_microbatch``), ``S`` the longest row (prompt + response), ``L`` the
    layers, ``H`` the hidden size, ``a`` the attention heads and ``V`` the padded vocabulary:

    - weights ``P/(t*p) * b``; gradients ``P/(t*p) * 4`` (Megatron's fp32 main grads);
    - optimizer ``P/(t*p) * (8 + 4 if b < 4)`` (Adam moments, fp32 master weights), divided by
      the data-parallel size with ``trainer.use_distributed_optimizer``;
    - activations (Korthikanti et al. 2022, 16-bit, scaled by ``b/2``), per layer of a stage:
      ``T*H*(10 + 24/t)`` (``34/t`` with sequence parallelism), plus, with Megatron's local
      attention (``model.transformer_impl: local``; Transformer Engine's fused attention keeps
      no scores), the attention scores ``5*a*min(S, T)*T/t`` unless
      ``recompute_granularity: selective`` recomputes them; ``full`` keeps only each layer's
      input ``T*H*2`` plus one layer recomputed; then the logits ``T*V/t*b`` (their fp32
      log-softmax runs in chunks of ``trainer.logprob_chunk_tokens``, small beside them);
    - SGLang, colocated on the same GPUs (``rollout.sglang.device: cuda``, no ``urls``):
      ``mem_fraction_static`` (unset: :data:`SGLANG_DEFAULT_STATIC`) of ``device_bytes``.
    """
    t, p = cfg.parallel.tp, cfg.parallel.pp
    model = cfg.model
    b = _BYTES[model.params_dtype]
    vocab = padded_vocab(hf.vocab_size, model.make_vocab_size_divisible_by, t)
    shard = parameter_count(hf, vocab) / (t * p)
    optimizer = shard * (8 + (4 if b < 4 else 0))
    if cfg.trainer.use_distributed_optimizer:
        optimizer /= dp
    tokens = cfg.trainer.max_tokens_per_microbatch
    row = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    h, layers = hf.hidden_size, -(-hf.num_hidden_layers // p)
    linear = tokens * h * (34 / t if cfg.parallel.sequence_parallel else 10 + 24 / t)
    scores = 0.0
    if model.transformer_impl == "local":
        scores = 5 * hf.num_attention_heads * min(row, tokens) * tokens / t
    if model.recompute_granularity == "full":
        per_stage = layers * tokens * h * 2 + linear + scores
    elif model.recompute_granularity == "selective":
        per_stage = layers * linear
    else:
        per_stage = layers * (linear + scores)
    activations = (per_stage / 2 + tokens * vocab / t) * b
    sglang, released = 0.0, False
    server = cfg.rollout.sglang
    colocated = cfg.rollout.engine == "sglang" and cfg.run.placement == "colocated"
    if colocated and server.device == "cuda" and not server.urls and device_bytes:
        share = server.mem_fraction_static or SGLANG_DEFAULT_STATIC
        sglang = share * device_bytes
        released = "--enable-memory-saver" in server.extra_args
    return MemoryEstimate(
        weights=int(shard * b),
        grads=int(shard * 4),
        optimizer=int(optimizer),
        activations=int(activations),
        sglang=int(sglang),
        sglang_released=released,
    )
