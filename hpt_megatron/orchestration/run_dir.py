"""The run directory belongs to its run.

Before anything is written, :func:`check_run_dir` compares a run directory that already holds a
run with the new one: the model of its ``config.yaml`` and of its newest checkpoint's
``config.json`` against the new model's shape (:data:`SHAPE_FIELDS`). Another model is an error
that writes nothing, so the old run's ``config.yaml``, tokenizer and checkpoints stay as they
were; another parallel layout (TP, PP, ...) is allowed, a resume reshards the checkpoint.

:func:`prepare_run_dir` then creates it with the resolved ``config.yaml`` and the tokenizer;
a folder that cannot be written is a :class:`~hpt_megatron.disk.WriteError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from hpt_megatron.config import HPTConfig, dump_yaml, load_config
from hpt_megatron.data.tokenizer import load_tokenizer
from hpt_megatron.disk import writing
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.provider import hf_config_with_overrides, load_hf_config
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.trainer.checkpoint_files import list_checkpoints

log = logging.getLogger(__name__)

# What makes a checkpoint loadable into the model: its architecture and tensor shapes.
SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "num_experts",
    "moe_intermediate_size",
)


def shape_differences(old: HFModelConfig, new: HFModelConfig) -> list[str]:
    """The shape fields that differ, as ``field: OLD there, NEW here``."""
    return [
        f"{name}: {getattr(old, name)} there, {getattr(new, name)} here"
        for name in SHAPE_FIELDS
        if getattr(old, name) != getattr(new, name)
    ]


def _configured_model(config_yaml: Path) -> HFModelConfig | None:
    """The model of an existing run's ``config.yaml``; None when it cannot be read any more
    (its model folder moved, an older schema): the checkpoint still speaks for it."""
    try:
        old = load_config(config_yaml)
        hf = load_hf_config(old.model.hf_config or dict(old.model.inline))
        return hf_config_with_overrides(hf, old.model)
    except (ValueError, OSError) as err:
        log.warning("%s: cannot read the model of the run there (%s)", config_yaml, err)
        return None


def check_run_dir(run_dir: Path, hf: HFModelConfig) -> None:
    """Raise ``ValueError`` when ``run_dir`` holds a run of another model (see the module);
    reads only."""
    found: list[tuple[str, HFModelConfig]] = []
    config_yaml = run_dir / "config.yaml"
    if config_yaml.is_file():
        configured = _configured_model(config_yaml)
        if configured is not None:
            found.append((str(config_yaml), configured))
    newest = next(reversed(list_checkpoints(run_dir / "checkpoints")), None)
    if newest is not None and (newest / "config.json").is_file():
        found.append((str(newest), load_hf_config(newest / "config.json")))
    for where, old in found:
        differences = shape_differences(old, hf)
        if differences:
            raise ValueError(
                f"run.output_dir {run_dir} holds a run of another model ({where}: "
                f"{'; '.join(differences)}); nothing was written. Use another run.output_dir, "
                "or remove that folder to start over"
            )


def prepare_run_dir(cfg: HPTConfig, ctx: ParallelContext, hf: HFModelConfig, run_dir: Path) -> Any:
    """Collective: the run directory with the resolved config in it; the tokenizer."""
    if ctx.is_driver:
        with writing(run_dir / "config.yaml", "resolved config"):
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, run_dir / "config.yaml")
    if ctx.world_size > 1:
        torch.distributed.barrier(group=ctx.cpu_group)
    with writing(run_dir / "tokenizer", "tokenizer"):
        tokenizer = load_tokenizer(cfg.model.tokenizer_source, run_dir)
    if len(tokenizer) > hf.vocab_size:
        raise ValueError(
            f"model vocab_size {hf.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )
    return tokenizer
