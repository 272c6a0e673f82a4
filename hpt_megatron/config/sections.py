"""Configuration sections owned by the training engine: run, model, parallel, trainer, logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hpt_megatron.config.rollout import check_sampling

ParamsDtype = Literal["fp32", "bf16", "fp16"]  # the weights' dtype in Megatron


@dataclass(kw_only=True)
class RunConfig:
    """Where a run writes, how it starts and how long it lasts."""

    name: str = "run"
    output_dir: str = "runs/${run.name}"  # resolved by the loader (OmegaConf interpolation)
    seed: int = 1234
    steps: int = 100
    resume: str = "auto"  # "auto" (newest good checkpoint), "never", or a checkpoint directory
    placement: Literal["colocated", "disaggregated"] = "colocated"
    # disaggregated: steps a batch's weights may lag the trainer's (orchestration/rollouts.py)
    max_staleness: int = 0
    val_every: int = 0  # steps between validations on data.val (0: never)
    val_max_prompts: int | None = None
    # Validation sampling: val_n responses per prompt (avg@val_n) at val_temperature / val_top_p
    # (the default: greedy, one each). The official HPT protocol: 8, 0.6, 0.95.
    val_n: int = 1
    val_temperature: float = 0.0
    val_top_p: float = 1.0
    # The score val/accuracy reports and "best" is chosen by: pooled, the share of correct
    # responses over all prompts; source_mean, the mean over data sources (benchmarks) of each
    # one's share (the official code's avg_score).
    val_score: Literal["pooled", "source_mean"] = "pooled"
    # A folder of recorded batches (a run's rollouts/ with logging.save_rollouts): train on them
    # in order, step_000001.jsonl first, without a rollout engine or weight sync.
    replay_rollouts: str | None = None

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {self.max_staleness}")
        self._validate_validation()
        if self.replay_rollouts is not None and not self.replay_rollouts:
            raise ValueError("replay_rollouts: must be a folder of step_N.jsonl files, got ''")
        if self.replay_rollouts and self.val_every:
            raise ValueError(
                "val_every: validation generates with the rollout engine, which a replay "
                "(run.replay_rollouts) does not build; set run.val_every=0"
            )
        if self.placement == "colocated" and self.max_staleness:
            raise ValueError(
                "max_staleness: colocated runs are synchronous; set placement: disaggregated"
            )

    def _validate_validation(self) -> None:
        check_sampling(self.val_n, self.val_temperature, self.val_top_p, prefix="val_")
        if self.val_n > 1 and self.val_temperature == 0:
            raise ValueError(
                f"val_n: {self.val_n} greedy responses per prompt are all the same; "
                "set run.val_temperature > 0 (the official protocol: 0.6) or val_n: 1"
            )

    @property
    def run_dir(self) -> str:
        """The run directory (``output_dir``, interpolations already resolved by the loader)."""
        return self.output_dir


@dataclass(kw_only=True)
class ModelConfig:
    """The policy: a Hugging Face config (and optionally weights) turned into a Megatron GPTModel.

    ``hf_config`` is a folder with ``config.json`` (or the file itself), or ``inline`` gives the
    config.json fields directly (tests and the tiny CPU default use that).
    """

    hf_config: str | None = None
    inline: dict = field(default_factory=dict)
    load: str | None = None  # Megatron distributed checkpoint to start from
    hf_weights: str | None = None  # HF folder whose safetensors initialise the model
    tokenizer: str | None = None
    rope_theta: float | None = None  # override (the paper: 40000 for Qwen2.5-Math-7B)
    max_position_embeddings: int | None = None  # override (the paper: 16384)
    params_dtype: ParamsDtype = "fp32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128
    # Mixture-of-experts router losses (Megatron's load-balancing aux loss and z-loss); off by
    # default, as RL peers run them. Read only for MoE models.
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float = 0.0

    @property
    def tokenizer_source(self) -> str | None:
        """``tokenizer``, else the weights' folder, else the config's (None: the arithmetic one)."""
        return self.tokenizer or self.hf_weights or self.hf_config

    def validate(self) -> None:
        if self.hf_config is None and not self.inline:
            raise ValueError("hf_config: give a Hugging Face config folder or model.inline fields")
        if self.fp8 is not None and self.params_dtype == "fp32":
            raise ValueError("fp8: FP8 training needs params_dtype bf16 or fp16")
        if self.recompute_granularity == "full" and self.recompute_method is None:
            raise ValueError("recompute_method: full recomputation needs 'uniform' or 'block'")
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class ParallelConfig:
    """Model parallel sizes; data parallel is whatever is left of the world size."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    sequence_parallel: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    ep: int = 1  # expert parallel (mixture-of-experts models): experts split over ep ranks
    etp: int | None = None  # expert tensor parallel; None: tp (Megatron's default)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def validate(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "expert_tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel: needs tp > 1")
        if self.vpp is not None and self.pp == 1:
            raise ValueError("vpp: virtual pipeline stages need pp > 1")
        if self.cp > 1:
            raise ValueError(
                f"cp: {self.cp}: context parallel is not wired into the trainer yet; use 1"
            )


@dataclass(kw_only=True)
class TrainerConfig:
    """Optimiser, schedule and micro-batching."""

    lr: float = 1e-5
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Optimizer updates (mini_batches_per_step x epochs_per_step per step) of linear warm-up from
    # lr 0: update k uses lr * (k-1) / warmup_steps, so the first runs at lr 0 (it moves no
    # weight) and update warmup_steps+1 reaches lr.
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    skip_update_grad_norm: float | None = None  # skip the update when the norm exceeds this
    max_tokens_per_microbatch: int = 4096  # token budget of one micro-batch (dynamic batching)
    # Several sequences per row of a micro-batch (block-diagonal causal mask, positions restarting
    # per sequence), up to the token budget; runs on Megatron's local attention layers only,
    # which still compute the masked-out scores of a row (benchmarks/packing_step.py).
    packing: bool = False
    # Rows whose every loss term is exactly zero (zero advantage and no entropy bonus, KL or SFT
    # weight: all-equal groups in GRPO, RLOO...) are neither forwarded nor backwarded; they stay
    # in the loss's denominators, so the gradient is unchanged. False trains them anyway (the
    # same gradient, computed: to measure what elision saves).
    elide_zero_rows: bool = True
    use_distributed_optimizer: bool = False
    # Tokens per fp32 chunk of the log-prob/entropy computation; None sizes it so that one chunk
    # of the local vocabulary shard is about 2**24 elements (64 MiB in fp32).
    logprob_chunk_tokens: int | None = None
    epochs_per_step: int = 1  # passes over a step's batch (PPO epochs)
    mini_batches_per_step: int = 1  # optimizer updates per step

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr} exceeds lr {self.lr}")
        if self.max_tokens_per_microbatch < 1:
            raise ValueError("max_tokens_per_microbatch: must be >= 1")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: must be >= 0, got {self.grad_clip}")
        if self.skip_update_grad_norm is not None and self.skip_update_grad_norm <= 0:
            raise ValueError(
                f"skip_update_grad_norm: must be > 0 (or null: no limit), "
                f"got {self.skip_update_grad_norm}"
            )
        if self.mini_batches_per_step < 1 or self.epochs_per_step < 1:
            raise ValueError("mini_batches_per_step and epochs_per_step must be >= 1")


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    jsonl: bool = True
    wandb_project: str | None = None
    progress_bar: bool = True
    # Write each step's RolloutBatch (samples with rewards, advantages and loss weights) to
    # <run_dir>/rollouts/step_N.jsonl; RolloutBatch.load_jsonl reads it back for a replay.
    save_rollouts: bool = False


@dataclass(kw_only=True)
class CheckpointConfig:
    save_every: int = 0  # steps; 0 saves only at the end
    keep_last: int = 2
    export_hf: bool = True  # export the final policy as an HF folder
    # Write the model/optimizer shards in a background thread while training goes on (the next
    # save, and the end of the run, wait for it); False writes them before the step returns.
    async_save: bool = True
