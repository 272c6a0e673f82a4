"""Tokenised prompt datasets: templating, demonstrations, length limits."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hpt_megatron.data.records import PromptRecord, RawExample, ReadReport
from hpt_megatron.data.templates import PromptTemplate

logger = logging.getLogger(__name__)

Overlong = Literal["filter", "truncate", "truncate_demos"]
THINK_OPEN = "<think>\n"


@dataclass
class DatasetStats:
    """What building a dataset kept, dropped and cut."""

    rows: int = 0
    bad_rows: int = 0
    overlong_filtered: int = 0
    prompts_truncated: int = 0
    demos_truncated: int = 0
    reports: list[ReadReport] = field(default_factory=list)


@dataclass(kw_only=True)
class TokenizeOptions:
    """Length limits and what to do with prompts or demonstrations over them.

    ``overlong="filter"`` drops (and counts) an example whose prompt or demonstration is too long;
    ``"truncate"`` keeps the prompt's last ``max_prompt_tokens`` tokens (so the generation prompt
    survives) and the demonstration's first ``max_response_tokens`` tokens (without EOS);
    ``"truncate_demos"`` is the official HPT/LUFFY code's rule: an over-long prompt is dropped
    (Unify-Post-Training hpt/verl/verl/utils/dataset/rl_dataset.py:151-159, ``filter_prompts``),
    an over-long demonstration kept as the first ``max_response_tokens`` tokens of demonstration
    + EOS (rl_dataset_with_target.py:147-157 cuts it to ``max_prefix_len``, the rollout appends
    EOS and cuts the response to ``response_length``: mix_vllm_rollout.py:163-166, 288).
    """

    max_prompt_tokens: int = 1024
    max_response_tokens: int = 8192
    overlong: Overlong = "filter"


class PromptDataset(Sequence[PromptRecord]):
    """An in-memory list of :class:`PromptRecord` with the statistics of how it was built."""

    def __init__(self, records: list[PromptRecord], stats: DatasetStats | None = None) -> None:
        self.records = records
        self.stats = stats or DatasetStats(rows=len(records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:  # type: ignore[override]
        return self.records[index]

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; demonstrations must end with EOS")
    return int(eos)


def demonstration_text(demonstration: str, prompt_text: str) -> str:
    """The demonstration as trained on: without its leading ``<think>\n`` when the prompt
    (a reasoning model's generation prompt) already ends with one."""
    if prompt_text.endswith(THINK_OPEN) and demonstration.startswith(THINK_OPEN):
        return demonstration[len(THINK_OPEN) :]
    return demonstration


def tokenize_examples(
    examples: list[RawExample],
    tokenizer: Any,
    *,
    template: PromptTemplate,
    options: TokenizeOptions,
    stats: DatasetStats | None = None,
) -> PromptDataset:
    """Template and tokenise examples into a :class:`PromptDataset`.

    Prompts go through ``template``; demonstrations are tokenised without special tokens and
    closed with EOS, a leading ``<think>\n`` dropped when the prompt already ends with one (as
    the official code: rl_dataset_with_target.py:138-139). Examples over the length limits are
    filtered or truncated per ``options``.
    """
    stats = stats or DatasetStats(rows=len(examples))
    texts = [template.render(ex.messages, tokenizer) for ex in examples]
    prompt_ids = tokenizer(texts, add_special_tokens=template.adds_special_tokens)["input_ids"]
    demo_texts = [
        demonstration_text(ex.demonstration, text)
        for ex, text in zip(examples, texts)
        if ex.demonstration is not None
    ]
    demo_ids_iter = iter(
        tokenizer(demo_texts, add_special_tokens=False)["input_ids"] if demo_texts else []
    )
    eos = _eos_id(tokenizer) if demo_texts else -1
    records = []
    for ex, text, ids in zip(examples, texts, prompt_ids):
        demo = None if ex.demonstration is None else [*next(demo_ids_iter), eos]
        prompt_over = len(ids) > options.max_prompt_tokens
        demo_over = demo is not None and len(demo) > options.max_response_tokens
        drop_demo = demo_over and options.overlong == "filter"
        if drop_demo or (prompt_over and options.overlong != "truncate"):
            stats.overlong_filtered += 1
            continue
        if prompt_over:
            ids = ids[-options.max_prompt_tokens :]
            stats.prompts_truncated += 1
        if demo is not None and demo_over:
            demo = demo[: options.max_response_tokens]
            stats.demos_truncated += 1
        records.append(
            PromptRecord(
                prompt_id=ex.prompt_id,
                prompt_ids=list(ids),
                prompt_text=text,
                ground_truth=ex.ground_truth,
                data_source=ex.data_source,
                demo_ids=demo,
                metadata=dict(ex.extra),
            )
        )
    if stats.overlong_filtered:
        logger.warning(
            "dropped %d of %d examples over max_prompt_tokens=%d / max_response_tokens=%d",
            stats.overlong_filtered,
            len(examples),
            options.max_prompt_tokens,
            options.max_response_tokens,
        )
    if not records:
        raise ValueError(
            f"every one of {len(examples)} examples is over the length limits "
            f"(data.max_prompt_tokens={options.max_prompt_tokens}, "
            f"data.max_response_tokens={options.max_response_tokens})"
        )
    return PromptDataset(records, stats)
