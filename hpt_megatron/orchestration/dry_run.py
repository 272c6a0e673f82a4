"""The summary ``hpt train --dry-run`` prints after its checks pass: the layout, the batch, the
checkpoint size, the SGLang servers and an estimate of the memory per GPU
(``orchestration/estimate.py``), then warnings and ``dry run: OK``."""

from __future__ import annotations

from hpt_megatron.config import HPTConfig
from hpt_megatron.models.hf_config import HFModelConfig, parameter_count
from hpt_megatron.orchestration.estimate import GIB, checkpoint_bytes, estimate_memory
from hpt_megatron.orchestration.layout_checks import gib
from hpt_megatron.orchestration.preflight import Findings, Target


def summary_lines(cfg: HPTConfig, world_size: int, findings: Findings, target: Target) -> list[str]:
    """What the run will do, derived from ``cfg`` (``findings`` of a passed preflight)."""
    dp = findings.dp or 1
    par = cfg.parallel
    where = "this machine" if target.here else "a GPU node (--target gpu)"
    lines = [
        f"dry run for {where}: world size {world_size} = data parallel {dp} x tp {par.tp} x "
        f"pp {par.pp} x cp {par.cp}"
    ]
    lines += _batch_lines(cfg, dp)
    lines.append(_rollout_line(cfg, target))
    if findings.hf is not None:
        lines += _model_lines(cfg, findings.hf, dp, target)
    lines += [f"WARNING: {w}" for w in findings.warnings]
    return lines + ["dry run: OK"]


def _batch_lines(cfg: HPTConfig, dp: int) -> list[str]:
    prompts, n = cfg.data.prompts_per_step, cfg.rollout.n
    rows = prompts * n
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    minis = cfg.trainer.mini_batches_per_step
    per_rank = -(-rows // (minis * dp))
    per_micro = max(1, cfg.trainer.max_tokens_per_microbatch // longest)
    return [
        f"rollouts per step: {prompts} prompts x {n} = {rows} (and the demonstrations the "
        f"preset adds); at most {rows * longest:,} tokens ({longest} per row)",
        f"updates per step: {minis} mini-batch(es) x {cfg.trainer.epochs_per_step} epoch(s); "
        f"per rank and update at most {-(-per_rank // per_micro)} micro-batch(es) of full-length "
        f"rows ({per_rank} rows, {cfg.trainer.max_tokens_per_microbatch} tokens each at most)",
    ]


def _rollout_line(cfg: HPTConfig, target: Target) -> str:
    if cfg.run.replay_rollouts:
        return f"rollouts: replayed from {cfg.run.replay_rollouts}"
    if cfg.rollout.engine == "cpu":
        return "rollouts: the CPU engine, in the trainer's processes"
    sglang = cfg.rollout.sglang
    if sglang.urls:
        return f"rollouts: the user's SGLang servers {', '.join(sglang.urls)}"
    if sglang.device == "cpu":
        return f"rollouts: {sglang.servers_per_node} SGLang CPU server(s) per node"
    step, tp = sglang.gpu_id_step, sglang.tp_size
    gpus = [
        [sglang.base_gpu_id + (i * tp + j) * step for j in range(tp)]
        for i in range(sglang.servers_per_node)
    ]
    node = f" (a node has {target.gpus_per_node})" if target.gpus_per_node else ""
    return (
        f"rollouts: {sglang.servers_per_node} SGLang server(s) per node, {cfg.run.placement}, "
        f"on GPUs {' | '.join(','.join(map(str, g)) for g in gpus)}{node}"
    )


def _model_lines(cfg: HPTConfig, hf: HFModelConfig, dp: int, target: Target) -> list[str]:
    params = parameter_count(hf)
    one = checkpoint_bytes(params, cfg.model.params_dtype)
    device = int(target.gpu_memory_gib * GIB) if target.gpu_memory_gib else None
    lines = [
        f"model: {hf.model_type}, {params / 1e9:.3g} B parameters; a checkpoint "
        f"(checkpoints/step_000050/...) takes {gib(one)}, {max(cfg.checkpoint.keep_last, 1)} "
        "kept"
    ]
    if not target.gpu:
        return lines  # the estimate is of GPU memory
    mem = estimate_memory(cfg, hf, dp, device)
    sglang = ""
    if mem.sglang:
        state = "released while training" if mem.sglang_released else "held while training"
        sglang = f" + SGLang {gib(mem.sglang)} ({state})"
    of = f" of {target.gpu_memory_gib:.0f} GiB" if device else " (device memory unknown: --gpu)"
    lines.append(
        f"memory per GPU (estimate): weights {gib(mem.weights)} + grads {gib(mem.grads)} + "
        f"optimizer {gib(mem.optimizer)} + activations {gib(mem.activations)}{sglang}: "
        f"peak {gib(mem.peak)}{of}"
    )
    if device and mem.peak > device:
        lines.append(
            f"WARNING: the estimated {gib(mem.peak)} per GPU exceeds the device's "
            f"{target.gpu_memory_gib:.0f} GiB (raise parallel.tp/pp, lower "
            "trainer.max_tokens_per_microbatch, recompute, or use the distributed optimizer)"
        )
    return lines
