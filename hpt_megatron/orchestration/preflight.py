"""Checks of a run that need no training: ``hpt train --dry-run`` runs them, ``hpt train`` too.

The loader (``load_config``) already checked every key's type and each section's values; here the
config meets the machine it is for: the world size against the parallel layout, the model config
against the layout and the SGLang servers, the distillation teacher against the layout and the
policy's vocabulary (``teacher_checks.py``), the files it names, the directories it writes, the
reward functions, the devices and the SGLang install. Every problem is found (not only the first)
and named by its dotted key; ``preflight`` raises them together as one ``ConfigError``.

The machine is this one (:meth:`Target.here`), or a GPU node described by ``hpt train --dry-run
--target gpu`` from a CPU login node (:meth:`Target.gpu_node`): GPU-only settings are then
allowed, and what only the GPU node can answer (a visible device, Transformer Engine and the
SGLang python installed there) is not checked.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hpt_megatron.config import ConfigError, HPTConfig
from hpt_megatron.config.data import BUILTIN_TASKS
from hpt_megatron.data import FieldMap, read_examples
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.provider import (
    check_hf_supported,
    check_parallel_against_model,
    hf_config_with_overrides,
    load_hf_config,
)
from hpt_megatron.orchestration.layout_checks import layout_problems
from hpt_megatron.orchestration.teacher_checks import teacher_problems
from hpt_megatron.parallel.runtime import check_world_size
from hpt_megatron.rewards.registry import resolve_reward
from hpt_megatron.rollout.plan import data_parallel_refusal, spans_nodes


@dataclass(frozen=True)
class Target:
    """The machine a config is checked for.

    Attributes:
        gpu: GPU-only settings (bf16 weights, recomputation, the distributed optimizer, nccl,
            SGLang on cuda...) can run there.
        here: it is this machine: its devices and installs (Transformer Engine, the SGLang
            python) are checked.
        gpus_per_node: GPUs of one node (SGLang's servers x tp_size must fit); None: unknown.
        gpu_memory_gib: one GPU's memory, for the memory estimate; None: unknown.
    """

    gpu: bool
    here: bool = True
    gpus_per_node: int | None = None
    gpu_memory_gib: float | None = None

    @classmethod
    def this_machine(
        cls, gpus_per_node: int | None = None, gpu_memory_gib: float | None = None
    ) -> Target:
        """This machine: its visible GPUs (count and the first one's memory, unless given)."""
        if not torch.cuda.is_available():
            return cls(False, True, gpus_per_node, gpu_memory_gib)
        count = torch.cuda.device_count()
        if count and gpu_memory_gib is None:
            gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / 1024**3
        return cls(True, True, gpus_per_node or count or None, gpu_memory_gib)

    @classmethod
    def gpu_node(
        cls, gpus_per_node: int | None = None, gpu_memory_gib: float | None = None
    ) -> Target:
        """A GPU node elsewhere (``--target gpu``)."""
        return cls(True, False, gpus_per_node, gpu_memory_gib)


@dataclass
class Findings:
    """What preflight found: problems (the run cannot start), warnings, and the model config."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hf: HFModelConfig | None = None
    dp: int | None = None

    def attempt(self, check: Callable[..., object], *args: object) -> object:
        """Run ``check``, recording its ``ConfigError`` as problems; its result, or None."""
        try:
            return check(*args)
        except ConfigError as err:
            self.problems.extend(err.problems)
            return None


def preflight(cfg: HPTConfig, world_size: int, target: Target | None = None) -> Findings:
    """Check everything about ``cfg`` that can be checked without training.

    Args:
        cfg: a loaded (hence already validated) config.
        world_size: the number of processes the run has (torchrun's ``WORLD_SIZE``).
        target: the machine it is for; None: this one.

    Returns:
        The findings (warnings, the model config, the data-parallel size) when there is no
        problem.

    Raises:
        ConfigError: every problem found, each naming its dotted key (``err.problems``).
    """
    findings = find_problems(cfg, world_size, target or Target.this_machine())
    if findings.problems:
        raise ConfigError(*findings.problems)
    return findings


def find_problems(cfg: HPTConfig, world_size: int, target: Target) -> Findings:
    """Every check, each group's problems recorded (a group stops at its first)."""
    found = Findings()
    found.dp = found.attempt(check_world_size, cfg.parallel, world_size)  # type: ignore[assignment]
    found.attempt(_check_schedule, cfg, world_size)
    found.hf = found.attempt(_check_model, cfg)  # type: ignore[assignment]
    found.problems += _path_problems(cfg)
    found.problems += teacher_problems(cfg, found.hf)
    found.problems += _device_problems(cfg, target)
    found.problems += _logging_problems(cfg, target)
    found.attempt(_check_data, cfg)
    found.attempt(_check_rewards, cfg)
    if cfg.run.replay_rollouts:
        found.attempt(_check_replay, cfg)
    else:  # a replay builds no rollout engine
        found.attempt(_check_sglang, cfg, target)
    if cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).is_dir():
        found.problems.append(_resume_problem(Path(cfg.run.resume)))
    problems, warnings = layout_problems(cfg, found.hf, found.dp, target.gpus_per_node)
    found.problems += problems
    found.warnings += warnings
    return found


def _resume_problem(path: Path) -> str:
    """``run.resume`` names no folder; a checkpoint's name is ``step_`` and six digits."""
    problem = f"run.resume: {path} is not a checkpoint directory"
    match = re.fullmatch(r"step_(\d+)", path.name)
    if match is None:
        return problem + " (a run's checkpoints/step_000004, with six digits)"
    padded = path.with_name(f"step_{int(match[1]):06d}")
    if padded != path and padded.is_dir():
        return f"{problem}; the checkpoint folders have six digits: {padded}"
    return problem


def _check_replay(cfg: HPTConfig) -> None:
    """``run.replay_rollouts``: a folder holding the batch of every step the run trains."""
    from hpt_megatron.orchestration.rollouts import recorded_steps

    folder = Path(cfg.run.replay_rollouts or "")
    if not folder.is_dir():
        raise ConfigError(f"run.replay_rollouts: {folder} is not a directory")
    steps = recorded_steps(folder)
    if not steps:
        raise ConfigError(
            f"run.replay_rollouts: {folder} holds no step_N.jsonl files (a run's rollouts/ "
            "folder, written with logging.save_rollouts=true)"
        )
    missing = [s for s in range(1, cfg.run.steps + 1) if s not in steps]
    if missing:
        raise ConfigError(
            f"run.replay_rollouts: {folder} has no batch for step {missing[0]} "
            f"(it records steps {min(steps)}..{max(steps)}, {len(steps)} files); "
            f"run.steps={cfg.run.steps} trains steps 1..{cfg.run.steps}: lower run.steps"
        )


def _check_schedule(cfg: HPTConfig, world_size: int) -> None:
    why = data_parallel_refusal(cfg)
    if cfg.rollout.cpu.data_parallel and why:
        raise ConfigError(
            f"rollout.cpu.data_parallel: every rank generating with its own CPU engine "
            f"cannot run here: {why}; set it to null (auto) or false"
        )
    if cfg.rollout.partial and cfg.run.placement != "disaggregated":
        raise ConfigError(
            "rollout.partial: partial rollouts continue generations across weight pushes, which "
            "only disaggregated placement makes (run.placement: disaggregated)"
        )
    sync = cfg.rollout.sglang.weight_sync
    if cfg.rollout.engine == "sglang" and sync in ("distributed", "tensor"):
        how = "broadcasts" if sync == "distributed" else "posts its weights"
        if cfg.run.placement != "colocated" and not cfg.run.replay_rollouts:
            raise ConfigError(
                f"rollout.sglang.weight_sync: {sync} {how} while the servers wait, "
                "which only colocated placement gives (run.placement: colocated); "
                "disaggregated runs use auto or disk"
            )
        if cfg.parallel.ep > 1:
            raise ConfigError(
                f"rollout.sglang.weight_sync: {sync}: with expert parallelism several "
                "ranks of a stage export; use auto or disk"
            )
    if cfg.rollout.engine == "sglang" and sync == "tensor" and spans_nodes(world_size):
        local = os.environ.get("LOCAL_WORLD_SIZE")
        raise ConfigError(
            "rollout.sglang.weight_sync: tensor hands the servers this host's memory, and the "
            f"run spans several nodes ({world_size} ranks, {local} on this one); use "
            "distributed, auto or disk"
        )


def _check_model(cfg: HPTConfig) -> HFModelConfig:
    """The model's config.json against the parallel layout and the algorithm; returns it."""
    model = cfg.model
    try:
        hf = load_hf_config(model.hf_config or dict(model.inline))
    except ValueError as err:
        raise ConfigError(f"model.hf_config: {err}") from None
    hf = hf_config_with_overrides(hf, model)
    check_hf_supported(hf)
    check_parallel_against_model(hf, cfg.parallel)
    _check_routing_replay(cfg, hf.is_moe, hf.model_type)
    _check_sglang_moe(cfg, hf)
    return hf


def _path_problems(cfg: HPTConfig) -> list[str]:
    """The weights, checkpoints and tokenizer the config names exist."""
    folders = {
        "model.hf_weights": cfg.model.hf_weights,
        "model.load": cfg.model.load,
        "algorithm.reference.hf_weights": cfg.algorithm.reference.hf_weights,
        "algorithm.reference.load": cfg.algorithm.reference.load,
        "algorithm.critic.load": cfg.algorithm.critic.load,
    }
    problems = [
        f"{key}: {path} is not a directory"
        for key, path in folders.items()
        if path is not None and not Path(path).is_dir()
    ]
    source = cfg.model.tokenizer_source
    if source not in (None, "arithmetic") and not Path(source).exists():
        problems.append(f"model.tokenizer: {source} does not exist")
    return problems


def _device_problems(cfg: HPTConfig, target: Target) -> list[str]:
    """Only what needs a GPU: Transformer Engine layers, FP8 (on TE), NCCL, sequence
    parallelism (TE layers), the reference's host offload. bf16 with fp32 main weights, the
    distributed optimizer and activation recomputation run on the CPU too (``_compat/cpu.py``
    redirects the CUDA names Megatron uses for them)."""
    gpu, model, problems = target.gpu, cfg.model, []
    if model.transformer_impl == "transformer_engine":
        if not gpu:
            problems.append("model.transformer_impl: transformer_engine needs a GPU; use auto")
        elif target.here and importlib.util.find_spec("transformer_engine") is None:
            problems.append("model.transformer_impl: transformer_engine is not installed")
    local_layers = not gpu or model.transformer_impl == "local"
    if model.fp8 is not None and local_layers:
        problems.append(
            f"model.fp8: {model.fp8}: FP8 training needs transformer_engine layers on a GPU"
        )
    if cfg.trainer.packing and gpu and model.transformer_impl != "local":
        problems.append(
            "trainer.packing: packed rows run on Megatron's local attention (a block-diagonal "
            "mask); Transformer Engine's THD format is not wired in; set model.transformer_impl: "
            "local, or packing: false"
        )
    if model.params_dtype != "fp32" and local_layers and not cfg.trainer.use_distributed_optimizer:
        problems.append(
            f"model.params_dtype: {model.params_dtype} on Megatron's local layers (the only ones "
            "without a GPU) needs trainer.use_distributed_optimizer: true: their norms keep fp32 "
            "weights, which the plain mixed-precision optimizer cannot write to a checkpoint "
            "(Megatron maps only its 16-bit parameters there)"
        )
    if cfg.parallel.sequence_parallel and local_layers:
        problems.append(
            "parallel.sequence_parallel: Megatron's local layers (the only ones without a GPU, "
            "or with model.transformer_impl: local) do not support sequence parallelism (their "
            "torch norm refuses it); it needs Transformer Engine layers on GPUs (set false)"
        )
    if gpu:
        return problems
    if cfg.algorithm.reference.offload:
        problems.append(
            "algorithm.reference.offload: moving the reference's weights to host memory between "
            "uses needs a GPU (on CPU they are in host memory already); set false"
        )
    if cfg.parallel.backend == "nccl":
        problems.append("parallel.backend: nccl needs GPUs; none are visible (use auto or gloo)")
    return problems


def _logging_problems(cfg: HPTConfig, target: Target) -> list[str]:
    """``logging.wandb_project`` needs wandb importable here (a GPU node checked from elsewhere
    is not asked)."""
    if not cfg.logging.wandb_project or not target.here:
        return []
    if importlib.util.find_spec("wandb") is None:
        return [
            f"logging.wandb_project: {cfg.logging.wandb_project} needs wandb, which is not "
            "installed (pip install 'hpt-megatron[wandb]', or pip install wandb); or unset it"
        ]
    return []


def _check_data(cfg: HPTConfig) -> None:
    data = cfg.data
    fields = FieldMap(
        prompt=data.prompt_key,
        answer=data.answer_key,
        demonstration=data.demonstration_key,
        data_source=data.data_source_key,
    )
    for key in ("train", "val"):
        source = getattr(data, key)
        if not source or source in BUILTIN_TASKS:
            continue
        try:
            read_examples(
                source, fields=fields, fmt=data.format, max_bad_share=data.max_bad_row_share
            )
        except (ValueError, OSError) as err:
            raise ConfigError(f"data.{key}: {err}") from None


def _check_rewards(cfg: HPTConfig) -> None:
    specs = {
        "fn": cfg.reward.fn,
        **{f"by_data_source.{k}": v for k, v in cfg.reward.by_data_source.items()},
    }
    for key, spec in specs.items():
        try:
            resolve_reward(spec)
        except ValueError as err:
            raise ConfigError(f"reward.{key}: {err}") from None


def _check_sglang_moe(cfg: HPTConfig, hf: HFModelConfig) -> None:
    """SGLang 0.5.23's own Qwen3-MoE makes every layer sparse: the dense layers of a model with
    ``mlp_only_layers`` or ``decoder_sparse_step`` > 1 get uninitialised experts (their MLP
    weights are dropped without a word) and generate NaN. Its transformers backend
    (``--model-impl transformers``) serves them right but reports no routed experts."""
    sglang = cfg.rollout.sglang
    if sglang.routed_experts and not (cfg.rollout.engine == "sglang" and hf.is_moe):
        raise ConfigError(
            "rollout.sglang.routed_experts: returns the experts of a mixture-of-experts model "
            f"served by SGLang; this run has rollout.engine {cfg.rollout.engine} and a "
            f"{hf.model_type} model (set false)"
        )
    if cfg.rollout.engine != "sglang" or not hf.is_moe:
        return
    if sglang.check_weights:
        raise ConfigError(
            "rollout.sglang.check_weights: SGLang 0.5.23's Qwen3-MoE has no get_weights_by_name "
            "(its /get_weights_by_name answers 400 for every tensor), so the loaded weights "
            "cannot be read back; set false"
        )
    if sglang.urls:  # the user's servers: their launch arguments are theirs
        return
    impl = "--model-impl transformers" in " ".join(sglang.extra_args).replace("=", " ")
    dense = [i for i, sparse in enumerate(hf.moe_layers) if not sparse]
    if impl and sglang.routed_experts:
        raise ConfigError(
            "rollout.sglang.routed_experts: SGLang's transformers backend (--model-impl "
            "transformers) routes with the HF model's own router and reports no routed experts "
            "(all zeros); routing replay with SGLang needs its own implementation (remove the "
            "flag; every layer of the model must then be sparse)"
        )
    if dense and not impl:
        raise ConfigError(
            f"rollout.engine: sglang: the model has dense layers {dense} among its sparse ones "
            "(mlp_only_layers / decoder_sparse_step), which SGLang 0.5.23's own "
            f"{hf.model_type} ignores (it makes them sparse and drops their weights: NaN "
            "outputs); add '--model-impl transformers' to rollout.sglang.extra_args"
        )


def _check_routing_replay(cfg: HPTConfig, is_moe: bool, model_type: str) -> None:
    if cfg.algorithm.spec().routing_replay != "rollout":
        return
    key = "algorithm.options.routing_replay: rollout"
    if not is_moe:
        raise ConfigError(
            f"{key} replays the experts of a mixture-of-experts model; {model_type} has no "
            "MoE layers (set none)"
        )
    if cfg.rollout.engine == "sglang" and not cfg.rollout.sglang.routed_experts:
        raise ConfigError(
            f"{key}: the SGLang servers return the experts they routed each token to only with "
            "rollout.sglang.routed_experts: true (--enable-return-routed-experts); set it"
        )
    if cfg.model.recompute_granularity is not None:
        raise ConfigError(
            f"{key}: activation recomputation reruns the routers in backward, which the replay "
            "does not feed; leave model.recompute_granularity null"
        )


def _check_sglang(cfg: HPTConfig, target: Target | None = None) -> None:
    """SGLang's python (and sglang-router) installed, the API key set, a GPU for the servers;
    none of it for a GPU node checked from elsewhere (``--target gpu``)."""
    if cfg.rollout.engine != "sglang":
        return
    target = target or Target.this_machine()
    if not target.here:
        return
    sglang = cfg.rollout.sglang
    if sglang.api_key_env and not os.environ.get(sglang.api_key_env):
        raise ConfigError(
            f"rollout.sglang.api_key_env: environment variable {sglang.api_key_env} is unset"
        )
    python = sglang.python_executable()
    # With urls nothing is launched, except a router asked for by name.
    launches = not sglang.urls or sglang.router is True
    if launches and not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ConfigError(
            f"rollout.engine: sglang needs SGLang's python, {python} is not there (set "
            "rollout.sglang.python or HPT_SGLANG_VENV; tools/sglang_env.sh builds it)"
        )
    if sglang.router is True:
        from hpt_megatron.rollout.sglang.router import router_installed

        if not router_installed(python):
            raise ConfigError(
                f"rollout.sglang.router: true needs sglang-router in {python}'s environment "
                "(tools/sglang_env.sh installs it), or router=auto to balance in the client"
            )
    if sglang.urls:
        return  # the user's servers run wherever they run
    if sglang.device == "cuda" and not target.gpu:
        raise ConfigError(
            "rollout.sglang.device: cuda needs a GPU for rollout.engine sglang; none are visible "
            "(use rollout.sglang.device=cpu, or rollout.engine=cpu)"
        )
