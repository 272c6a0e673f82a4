"""The ``data`` and ``reward`` sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BUILTIN_TASKS = ("arithmetic",)


@dataclass(kw_only=True)
class ArithmeticTaskConfig:
    """The built-in arithmetic task (``data.train: arithmetic``)."""

    levels: list[int] = field(default_factory=lambda: [1])
    train_size: int = 5000  # per level (level 1: 2-digit addition, 8100 problems in all)
    test_size: int = 200  # per level; disjoint from train
    seed: int = 0  # fixes the splits; independent of run.seed

    def validate(self) -> None:
        if not self.levels:
            raise ValueError("levels: give at least one level")
        bad = [lv for lv in self.levels if lv not in range(1, 6)]
        if bad:
            raise ValueError(f"levels: {bad} not in 1..5")
        if self.train_size < 1 or self.test_size < 1:
            raise ValueError("train_size and test_size must be >= 1")


@dataclass(kw_only=True)
class DataConfig:
    """Datasets, prompt templating, length limits and bad-row tolerance."""

    train: str = "arithmetic"  # a file (parquet/json/jsonl) or a built-in task name
    val: str | None = None
    prompts_per_step: int = 8
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 1024
    format: Literal["auto", "parquet", "json", "jsonl"] = "auto"
    prompt_key: str = "prompt"  # dotted names reach into nested fields
    answer_key: str | None = None  # None: reward_model.ground_truth, then answer, ground_truth
    demonstration_key: str = "target"
    data_source_key: str = "data_source"
    template: Literal["chat", "llama_zero", "raw"] = "chat"
    system_prompt: str | None = "qwen_math"  # "qwen_math", literal text, or null for none
    drop_dataset_system: bool = True
    # Prompts or demonstrations over the limits: filter drops the example; truncate cuts both;
    # truncate_demos (the official HPT code) drops over-long prompts, cuts over-long demonstrations
    overlong: Literal["filter", "truncate", "truncate_demos"] = "filter"
    max_bad_row_share: float = 0.05
    shuffle: bool = True
    seed: int | None = None  # None: run.seed
    arithmetic: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)

    def validate(self) -> None:
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step: must be >= 1, got {self.prompts_per_step}")
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1:
            raise ValueError("max_prompt_tokens and max_response_tokens must be >= 1")
        if not 0.0 <= self.max_bad_row_share < 1.0:
            raise ValueError(f"max_bad_row_share: must be in [0, 1), got {self.max_bad_row_share}")
        if not self.train:
            raise ValueError("train: give a dataset file or a built-in task name")
        for key in ("train", "val"):
            value = getattr(self, key)
            if value and value not in BUILTIN_TASKS and "." not in value.rsplit("/", 1)[-1]:
                raise ValueError(
                    f"{key}: '{value}' is neither a built-in task {list(BUILTIN_TASKS)} nor a "
                    "file with a .parquet/.json/.jsonl suffix"
                )


@dataclass(kw_only=True)
class RewardConfig:
    """The reward function and the grading pool."""

    fn: str = "math"  # a registered name or "package.module:function"
    by_data_source: dict[str, str] = field(default_factory=dict)  # e.g. {gpqa: multiple_choice}
    num_workers: int = 2
    timeout_s: float = 5.0  # CPU seconds per answer (4x that of wall time); a slower one scores 0
    memory_limit_mb: int | None = 4096  # per grading worker

    def validate(self) -> None:
        from hpt_megatron.rewards.registry import check_reward_spec

        for key, spec in [("fn", self.fn)] + [
            (f"by_data_source.{k}", v) for k, v in self.by_data_source.items()
        ]:
            try:
                check_reward_spec(spec)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")

    def fn_for(self, data_source: str) -> str:
        """The reward spec for one data source."""
        return self.by_data_source.get(data_source, self.fn)
