"""The Sample / RolloutBatch contract: one record per response, serialisable and replayable."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(kw_only=True)
class Sample:
    """One response (an on-policy rollout or an offline demonstration) to one prompt.

    ``group_id`` ties the n rollouts of a prompt together (group statistics, the HPT gate).
    ``rollout_logprobs`` are the engine's per-token log-probs of ``response_ids`` when it returns
    them. ``rl_weight`` and ``sft_weight`` are the alpha and beta of the unified loss.
    """

    prompt_id: str
    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float] | None = None
    reward: float | None = None
    is_demo: bool = False
    rl_weight: float = 1.0
    sft_weight: float = 0.0
    ground_truth: str | None = None
    response_text: str | None = None
    finish_reason: str = "stop"  # "stop" | "length" | "abort"
    weight_version: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rollout_logprobs is not None and len(self.rollout_logprobs) != len(
            self.response_ids
        ):
            raise ValueError(
                f"sample {self.prompt_id}: {len(self.rollout_logprobs)} rollout log-probs for "
                f"{len(self.response_ids)} response tokens"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Sample fields: {sorted(unknown)}")
        return cls(**data)


@dataclass
class RolloutBatch:
    """The samples of one training step, in group order."""

    samples: list[Sample]
    step: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    def save_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as fh:
            for sample in self.samples:
                fh.write(json.dumps({"step": self.step, **sample.to_dict()}) + "\n")

    @classmethod
    def load_jsonl(cls, path: str | Path) -> RolloutBatch:
        samples, step = [], 0
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    step = row.pop("step", step)
                    samples.append(Sample.from_dict(row))
                except (ValueError, TypeError) as err:
                    raise ValueError(f"{path}:{lineno}: not a Sample record: {err}") from None
        return cls(samples, step)
