"""Build the datasets and the sampler from the ``data`` config section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from hpt_megatron.config.data import BUILTIN_TASKS, DataConfig
from hpt_megatron.data.arithmetic import build_arithmetic_dataset
from hpt_megatron.data.dataset import (
    DatasetStats,
    PromptDataset,
    TokenizeOptions,
    tokenize_examples,
)
from hpt_megatron.data.readers import FieldMap, read_examples
from hpt_megatron.data.sampler import PromptSampler
from hpt_megatron.data.templates import QWEN_MATH_SYSTEM_PROMPT, PromptTemplate


def template_from_config(cfg: DataConfig) -> PromptTemplate:
    system = QWEN_MATH_SYSTEM_PROMPT if cfg.system_prompt == "qwen_math" else cfg.system_prompt
    return PromptTemplate(
        kind=cfg.template, system_prompt=system, drop_dataset_system=cfg.drop_dataset_system
    )


def load_file_dataset(path: str | Path, tokenizer: Any, cfg: DataConfig) -> PromptDataset:
    """Read, validate, template and tokenise one dataset file per the ``data`` config."""
    fields = FieldMap(
        prompt=cfg.prompt_key,
        answer=cfg.answer_key,
        demonstration=cfg.demonstration_key,
        data_source=cfg.data_source_key,
    )
    examples, report = read_examples(
        path, fields=fields, fmt=cfg.format, max_bad_share=cfg.max_bad_row_share
    )
    stats = DatasetStats(rows=report.rows, bad_rows=len(report.bad), reports=[report])
    options = TokenizeOptions(
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_response_tokens=cfg.max_response_tokens,
        overlong=cfg.overlong,
    )
    return tokenize_examples(
        examples, tokenizer, template=template_from_config(cfg), options=options, stats=stats
    )


def build_prompt_dataset(
    cfg: DataConfig, tokenizer: Any, split: Literal["train", "val"] = "train"
) -> PromptDataset:
    """The train or validation :class:`PromptDataset` named by ``data.train`` / ``data.val``.

    ``arithmetic`` builds the built-in task (its test split serves as ``val``).
    """
    source = cfg.train if split == "train" else (cfg.val or "")
    if not source:
        raise ValueError("data.val: no validation set configured")
    if source in BUILTIN_TASKS:
        task = cfg.arithmetic
        options = TokenizeOptions(
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_response_tokens=cfg.max_response_tokens,
            overlong=cfg.overlong,
        )
        return build_arithmetic_dataset(
            tokenizer,
            "train" if split == "train" else "test",
            task.levels,
            seed=task.seed,
            train_size=task.train_size,
            test_size=task.test_size,
            options=options,
        )
    return load_file_dataset(source, tokenizer, cfg)


def build_sampler(cfg: DataConfig, dataset: PromptDataset, run_seed: int) -> PromptSampler:
    """The scheduler's batch iterator: ``data.prompts_per_step`` prompts per batch."""
    seed = run_seed if cfg.seed is None else cfg.seed
    return PromptSampler(dataset, cfg.prompts_per_step, seed=seed, shuffle=cfg.shuffle)
