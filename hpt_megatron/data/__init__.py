"""Datasets, prompt templates, the arithmetic task and the Sample / RolloutBatch contract.

The scheduler's entry points::

    dataset = build_prompt_dataset(cfg.data, tokenizer, "train")   # a PromptDataset
    sampler = build_sampler(cfg.data, dataset, cfg.run.seed)       # endless, resumable
    batch = sampler.next_batch()                                   # list[PromptRecord]
    state = sampler.state_dict(); sampler.load_state_dict(state)
"""

from hpt_megatron.data.arithmetic import (
    ArithmeticProblem,
    arithmetic_examples,
    arithmetic_problems,
    build_arithmetic_dataset,
)
from hpt_megatron.data.dataset import (
    DatasetStats,
    PromptDataset,
    TokenizeOptions,
    tokenize_examples,
)
from hpt_megatron.data.factory import build_prompt_dataset, build_sampler, load_file_dataset
from hpt_megatron.data.readers import FieldMap, read_examples
from hpt_megatron.data.records import BadRow, PromptRecord, RawExample, ReadReport
from hpt_megatron.data.sample import RolloutBatch, Sample
from hpt_megatron.data.sampler import PromptSampler
from hpt_megatron.data.templates import (
    LLAMA_ZERO_TEMPLATE,
    QWEN_MATH_SYSTEM_PROMPT,
    PromptTemplate,
)
from hpt_megatron.data.tokenizer import build_arithmetic_tokenizer

__all__ = [
    "LLAMA_ZERO_TEMPLATE",
    "QWEN_MATH_SYSTEM_PROMPT",
    "ArithmeticProblem",
    "BadRow",
    "DatasetStats",
    "FieldMap",
    "PromptDataset",
    "PromptRecord",
    "PromptSampler",
    "PromptTemplate",
    "RawExample",
    "ReadReport",
    "RolloutBatch",
    "Sample",
    "TokenizeOptions",
    "arithmetic_examples",
    "arithmetic_problems",
    "build_arithmetic_dataset",
    "build_arithmetic_tokenizer",
    "build_prompt_dataset",
    "build_sampler",
    "load_file_dataset",
    "read_examples",
    "tokenize_examples",
]
