"""Preflight checks of the run's shape, from the config, the model's ``config.json`` and the
world alone (so a dry run on a login node makes them for the GPU node): SGLang's context length
and tensor parallelism against the model, the servers against the node's GPUs, the batch against
the data-parallel ranks, the directories the run writes and the disk space its checkpoints take.

Each function returns its problems (the run cannot start: ``key: why``) and warnings (it starts,
but probably not as meant).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hpt_megatron.config import HPTConfig
from hpt_megatron.models.hf_config import HFModelConfig, parameter_count
from hpt_megatron.orchestration.estimate import GIB, checkpoint_bytes

Found = tuple[list[str], list[str]]  # (problems, warnings)

# SGLang's switch for a context length above the model's positions (rollout.sglang.env).
LONGER_CONTEXT_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"


def layout_problems(
    cfg: HPTConfig, hf: HFModelConfig | None, dp: int | None, gpus_per_node: int | None
) -> Found:
    """Every check of this module (those needing the model config skipped without one)."""
    problems, warnings = writable_problems(cfg), list[str]()
    if dp is not None:
        p, w = batch_problems(cfg, dp)
        problems, warnings = problems + p, warnings + w
    if hf is not None:
        problems += sglang_model_problems(cfg, hf)
        p, w = disk_problems(cfg, hf)
        problems, warnings = problems + p, warnings + w
    problems += server_gpu_problems(cfg, gpus_per_node)
    return problems, warnings


def sglang_model_problems(cfg: HPTConfig, hf: HFModelConfig) -> list[str]:
    """SGLang's context length against the model's positions and the longest request, and its
    tensor parallelism against the attention heads (launched servers only)."""
    if cfg.rollout.engine != "sglang":
        return []
    sglang, problems = cfg.rollout.sglang, []
    positions = hf.max_position_embeddings
    context = sglang.context_length or positions
    launched = not sglang.urls
    longer_ok = sglang.env.get(LONGER_CONTEXT_ENV, "") not in ("", "0", "false")
    if launched and context > positions and not longer_ok:
        problems.append(
            f"rollout.sglang.context_length: {context} exceeds the model's "
            f"max_position_embeddings {positions} (after model.max_position_embeddings); SGLang "
            f"refuses to start: lower it, raise model.max_position_embeddings, or set "
            f"{LONGER_CONTEXT_ENV}: '1' under rollout.sglang.env"
        )
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    if longest > context:
        problems.append(
            f"rollout.max_new_tokens: data.max_prompt_tokens + rollout.max_new_tokens = "
            f"{longest} exceeds SGLang's context length {context}, which rejects such a request; "
            "lower one of them or raise rollout.sglang.context_length"
        )
    if not launched:
        return problems
    tp, heads, kv = sglang.tp_size, hf.num_attention_heads, hf.num_key_value_heads
    if heads % tp or (kv % tp if tp < kv else tp % kv):
        problems.append(
            f"rollout.sglang.tp_size: {tp} must divide the model's {heads} attention heads and "
            f"divide, or be a multiple of, its {kv} key-value heads"
        )
    return problems


def server_gpu_problems(cfg: HPTConfig, gpus_per_node: int | None) -> list[str]:
    """The GPUs the launched servers of one node take must exist on the node."""
    sglang = cfg.rollout.sglang
    if cfg.rollout.engine != "sglang" or sglang.urls or sglang.device != "cuda":
        return []
    if gpus_per_node is None:
        return []
    last = sglang.base_gpu_id + (sglang.servers_per_node * sglang.tp_size - 1) * sglang.gpu_id_step
    if last < gpus_per_node:
        return []
    return [
        f"rollout.sglang.servers_per_node: {sglang.servers_per_node} servers x tp_size "
        f"{sglang.tp_size} (base_gpu_id {sglang.base_gpu_id}, gpu_id_step {sglang.gpu_id_step}) "
        f"need GPUs up to id {last}; a node has {gpus_per_node}"
    ]


def batch_problems(cfg: HPTConfig, dp: int) -> Found:
    """Mini-batches against the prompts, rows against the data-parallel ranks, the longest row
    against the micro-batch token budget."""
    prompts, minis = cfg.data.prompts_per_step, cfg.trainer.mini_batches_per_step
    problems, warnings = [], []
    if minis > prompts:
        problems.append(
            f"trainer.mini_batches_per_step: {minis} mini-batches of whole prompt groups need at "
            f"least as many prompts per step (data.prompts_per_step: {prompts})"
        )
    elif prompts % minis:
        warnings.append(
            f"trainer.mini_batches_per_step: {minis} does not divide data.prompts_per_step "
            f"{prompts}: the mini-batches differ in size"
        )
    rows = prompts * cfg.rollout.n // minis
    if rows < dp:
        warnings.append(
            f"data.prompts_per_step: a mini-batch has {rows} rows for {dp} data-parallel ranks: "
            "some ranks get no rows"
        )
    longest = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    if longest > cfg.trainer.max_tokens_per_microbatch:
        warnings.append(
            f"trainer.max_tokens_per_microbatch: {cfg.trainer.max_tokens_per_microbatch} is less "
            f"than a full-length row ({longest} tokens): such a row is a micro-batch of its own"
        )
    return problems, warnings


def _existing(path: Path) -> Path:
    """``path``, or its nearest existing ancestor (the one a ``mkdir -p`` writes into)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problems(cfg: HPTConfig) -> list[str]:
    """The run directory (and the SGLang weight-sync and log folders the config names) can be
    made and written by this user."""
    folders: dict[str, str | None] = {"run.output_dir": cfg.run.output_dir}
    if cfg.rollout.engine == "sglang":
        sglang = cfg.rollout.sglang
        folders["rollout.sglang.weight_sync_dir"] = sglang.weight_sync_dir
        folders["rollout.sglang.log_dir"] = sglang.log_dir
    problems = []
    for key, folder in folders.items():
        if folder is None:
            continue
        path = Path(folder)
        if path.exists() and not path.is_dir():
            problems.append(f"{key}: {folder} is a file, not a directory")
            continue
        base = _existing(path)
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            problems.append(f"{key}: {folder} cannot be written ({base} is not writable)")
    return problems


def disk_problems(cfg: HPTConfig, hf: HFModelConfig) -> Found:
    """Free space under the run directory against one checkpoint plus the HF export (a problem),
    and against the ``checkpoint.keep_last`` kept ones plus the one being written (a warning)."""
    params = parameter_count(hf)
    one = checkpoint_bytes(params, cfg.model.params_dtype)
    export = params * (4 if cfg.model.params_dtype == "fp32" else 2) * cfg.checkpoint.export_hf
    free = free_bytes(Path(cfg.run.output_dir))
    kept = (max(cfg.checkpoint.keep_last, 1) + 1) * one + export
    where = f"run.output_dir: {cfg.run.output_dir} has {free / GIB:.1f} GiB free"
    if free < one + export:
        return [f"{where}, less than one checkpoint and the HF export ({gib(one + export)})"], []
    if free < kept:
        return [], [f"{where}; the kept checkpoints and the export take up to {gib(kept)}"]
    return [], []


def free_bytes(path: Path) -> int:
    """Free bytes on the file system ``path`` is (or will be made) on."""
    return shutil.disk_usage(_existing(path)).free


def gib(num_bytes: float) -> str:
    """``12.3 GiB`` (``0.004 GiB`` for small ones)."""
    value = num_bytes / GIB
    return f"{value:.1f} GiB" if value >= 0.1 else f"{value:.3g} GiB"
