"""Preflight checks of the distillation teacher (``algorithm.teacher``): its ``config.json``
against the policy's layout, and its vocabulary against the policy's.

Token alignment across vocabularies is out of scope: the teacher scores the policy's token ids,
so both must read them alike. When the teacher's folder has a tokenizer its vocabulary (token ->
id) must equal the policy's; without one the two configs' ``vocab_size`` must be equal. In both
cases every id of the policy's tokenizer must be a row of the teacher's embedding.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hpt_megatron.config import ConfigError, HPTConfig
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.provider import (
    check_hf_supported,
    check_parallel_against_model,
    load_hf_config,
)

KEY = "algorithm.teacher.hf_path"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def teacher_problems(cfg: HPTConfig, hf: HFModelConfig | None) -> list[str]:
    """Problems with the teacher (none without one); ``hf``: the policy's config, when read."""
    path = cfg.algorithm.teacher.hf_path
    if not path:
        return []
    if not Path(path).is_dir():
        return [f"{KEY}: {path} is not a directory"]
    try:
        teacher = load_hf_config(path)
        check_hf_supported(teacher)
    except (ValueError, ConfigError) as err:
        return [f"{KEY}: {err}"]
    try:
        if cfg.algorithm.spec().needs_teacher_logprobs:  # the trainer builds it in its layout
            check_parallel_against_model(teacher, cfg.parallel)
    except ConfigError as err:
        return [f"{KEY}: the teacher {path} does not fit the declared layout: {err}"]
    if hf is None:
        return []
    return _vocabulary_problems(cfg, hf, teacher, path)


def _vocabulary_problems(
    cfg: HPTConfig, hf: HFModelConfig, teacher: HFModelConfig, path: str
) -> list[str]:
    policy_source = cfg.model.tokenizer_source or "arithmetic"
    if not any((Path(path) / name).exists() for name in _TOKENIZER_FILES):
        if teacher.vocab_size != hf.vocab_size:
            return [
                f"{KEY}: the teacher {path} has vocab_size {teacher.vocab_size} and no tokenizer, "
                f"the policy (model) vocab_size {hf.vocab_size}: teacher and student must share "
                "the vocabulary"
            ]
        return []
    policy_vocab = _vocab(policy_source)
    teacher_vocab = _vocab(path)
    if teacher_vocab != policy_vocab:
        differ = sorted(set(teacher_vocab.items()) ^ set(policy_vocab.items()))[:3]
        return [
            f"{KEY}: the teacher's tokenizer ({path}, {len(teacher_vocab)} tokens) and the "
            f"policy's (model.tokenizer: {policy_source}, {len(policy_vocab)} tokens) differ "
            f"(e.g. {differ}): teacher and student must share the vocabulary"
        ]
    largest = max(policy_vocab.values(), default=-1)
    if largest >= teacher.vocab_size:
        return [
            f"{KEY}: the policy's tokenizer (model.tokenizer: {policy_source}) has id {largest}, "
            f"beyond the teacher's vocab_size {teacher.vocab_size} ({path})"
        ]
    return []


def _vocab(source: str) -> dict[str, int]:
    """Token -> id of the tokenizer at ``source`` (``arithmetic``: the built-in one)."""
    from hpt_megatron.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer: Any = load_tokenizer(source, scratch)
        return dict(tokenizer.get_vocab())
