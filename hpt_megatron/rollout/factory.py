"""Rollout engines from the plan (``rollout/plan.py``), and ``SamplingParams`` from the config.

The driver's engine (:func:`build_rollout_engine`), each other rank's replica under data-parallel
generation (:func:`build_replica`), and the SGLang servers of a run over several nodes
(:func:`start_rollout_nodes`). Their weights are overwritten from the trainer at step 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpt_megatron.config import HPTConfig
from hpt_megatron.config.rollout import RolloutConfig
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.rollout.base import RolloutEngine, SamplingParams
from hpt_megatron.rollout.plan import RolloutPlan
from hpt_megatron.rollout.seeds import derive_seed

if TYPE_CHECKING:
    from hpt_megatron.rollout.cpu_engine import HFCpuEngine
    from hpt_megatron.rollout.sglang.nodes import NodeServerGroup


def sampling_params(
    cfg: RolloutConfig, *, seed: int | None = None, **overrides: object
) -> SamplingParams:
    """``SamplingParams`` from the ``rollout`` section (``overrides`` win, e.g. for validation)."""
    params = SamplingParams(
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        stop_strings=list(cfg.stop),
        seed=seed,
    )
    for key, value in overrides.items():
        if not hasattr(params, key):
            raise ValueError(f"unknown sampling parameter {key!r}")
        setattr(params, key, value)
    return params


def build_rollout_engine(
    plan: RolloutPlan,
    cfg: HPTConfig,
    hf: HFModelConfig,
    tokenizer: Any,
    run_dir: Path,
    ctx: ParallelContext,
    nodes: NodeServerGroup | None = None,
) -> RolloutEngine:
    """The driver's rollout engine. ``nodes``: the SGLang servers every node started
    (:func:`start_rollout_nodes`)."""
    if plan.engine == "cpu":
        if not plan.data_parallel:
            return build_cpu_engine(plan, cfg, hf, tokenizer)
        from hpt_megatron.rollout.replicas import DataParallelEngine

        return DataParallelEngine(build_cpu_engine(plan, cfg, hf, tokenizer), ctx)
    from hpt_megatron.rollout.sglang import build_sglang_engine

    # Serve the starting HF checkpoint when there is one (no random full-size copy to write).
    return build_sglang_engine(
        plan.rollout,
        hf=hf,
        tokenizer=tokenizer,
        run_dir=run_dir,
        model_path=cfg.model.hf_weights,
        nodes=nodes,
    )


def build_replica(
    plan: RolloutPlan, cfg: HPTConfig, hf: HFModelConfig, tokenizer: Any, ctx: ParallelContext
) -> HFCpuEngine | None:
    """This rank's CPU engine replica under data-parallel generation (``None`` on the driver,
    whose replica its engine holds, and without data-parallel generation)."""
    if ctx.is_driver or not plan.data_parallel:
        return None
    return build_cpu_engine(plan, cfg, hf, tokenizer)


def build_cpu_engine(
    plan: RolloutPlan, cfg: HPTConfig, hf: HFModelConfig, tokenizer: Any
) -> HFCpuEngine:
    """The CPU engine (the driver's, or a rank's replica under data-parallel generation)."""
    from hpt_megatron.rollout.cpu_engine import HFCpuEngine

    assert plan.threads.generation is not None, "a CPU engine's plan has its threads"
    return HFCpuEngine.from_config(
        hf,
        max_batch_rows=cfg.rollout.cpu.max_batch_rows,
        threads=plan.threads.generation,
        seed=derive_seed(cfg.run.seed, "engine_init"),
        dtype=cfg.rollout.cpu.dtype,
        tokenizer=tokenizer,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        record_routing=cfg.algorithm.spec().routing_replay == "rollout",
    )


def build_teacher_engine(
    plan: RolloutPlan, cfg: HPTConfig, tokenizer: Any, run_dir: Path
) -> RolloutEngine | None:
    """The driver's handle on the teacher (``algorithm.teacher``), where the driver needs one:
    its SGLang servers (``urls``: they score the rollouts and write demonstrations), or, for
    demonstrations only (``teacher_route: generate``), the ``hf_path`` model in transformers on
    this process's CPU, beside the trainer's frozen copy that scores (meant for small teachers:
    serve a large one with SGLang). ``None`` when the trainer's copy does all the teacher does."""
    teacher, spec = cfg.algorithm.teacher, cfg.algorithm.spec()
    if not spec.needs_teacher:
        return None
    if teacher.urls:
        from hpt_megatron.config.rollout import SGLangConfig
        from hpt_megatron.rollout.sglang.engine import SGLangEngine

        # No router of ours in front: it refuses the batched scoring request (a list of
        # logprob_start_len); the client balances the requests over the servers itself.
        servers = SGLangConfig(
            urls=list(teacher.urls), startup_timeout_s=teacher.timeout_s, router=False
        )
        return SGLangEngine.connect(
            servers, run_dir=run_dir / "teacher", key="algorithm.teacher.urls"
        )
    if not spec.needs_teacher_demos or not teacher.hf_path:
        return None
    from hpt_megatron.rollout.cpu_engine import HFCpuEngine

    return HFCpuEngine.from_pretrained(
        teacher.hf_path,
        dtype=cfg.rollout.cpu.dtype,
        tokenizer=tokenizer,
        max_batch_rows=cfg.rollout.cpu.max_batch_rows,
        threads=plan.threads.generation,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )


def start_rollout_nodes(
    plan: RolloutPlan,
    cfg: HPTConfig,
    ctx: ParallelContext,
    hf: HFModelConfig,
    tokenizer: Any,
    run_dir: Path,
) -> NodeServerGroup | None:
    """SGLang servers on every node, for a run over several nodes that launches its own
    (``plan.launches_servers``); ``None`` otherwise. A collective: every rank calls it. The
    driver first writes the folder they serve."""
    if not plan.launches_servers:
        return None
    from hpt_megatron.rollout.sglang.build import serve_path
    from hpt_megatron.rollout.sglang.nodes import NodeInfo, start_node_servers

    nodes = NodeInfo.from_env()
    if nodes.num_nodes == 1:
        return None  # the driver launches them (SGLangEngine.launch)
    model_path = None
    if ctx.is_driver:
        model_path = serve_path(hf, tokenizer, run_dir, cfg.model.hf_weights)
    return start_node_servers(
        plan.rollout.sglang,
        model_path=model_path,
        run_dir=run_dir,
        group=ctx.cpu_group,
        nodes=nodes,
    )
