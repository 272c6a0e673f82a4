"""The Sample / RolloutBatch contract: one record per response, serialisable and replayable.

A :class:`RolloutBatch` is what the driver hands to every rank for one training step: the samples
with their rewards, advantages and loss weights, so the update needs nothing else, and a saved
batch (``save_jsonl``) can be trained on again without any rollout engine.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# ``Sample.metadata["route"]`` of a rollout that HPT with a teacher trains with the distillation
# part instead of SFT (no outcome advantage; ``orchestration/batch_rules.py`` sets it).
TEACHER_ROUTE = "teacher"
# ``Sample.metadata["route"]`` of a demonstration the teacher wrote (``teacher_route: generate``)
# for a prompt that failed the gate without one of its own; trained with SFT like the dataset's.
TEACHER_DEMO_ROUTE = "teacher_demo"


@dataclass(kw_only=True)
class Sample:
    """One response (an on-policy rollout or an offline demonstration) to one prompt.

    ``group_id`` ties the n rollouts of a prompt together (group statistics, the HPT gate).
    ``rollout_logprobs`` are the engine's per-token log-probs of ``response_ids`` when it returns
    them. ``advantage`` is the row's outcome advantage (the same for each of its tokens; set by the
    batch rule for rows of the RL term, 0 elsewhere). ``rl_weight`` and ``sft_weight`` are the
    alpha and beta of the unified loss. ``routed_experts`` (routing replay of mixture-of-experts
    models) are the experts the engine's routers chose, ``[num_tokens - 1, MoE layers, top-k]``
    integer ids: one row per token it ran (the prompt, then every response token but the last,
    which no forward pass saw), MoE layers in model order.
    """

    prompt_id: str
    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float] | None = None
    teacher_logprobs: list[float] | None = None  # a teacher's servers' scores of the response
    reward: float | None = None
    advantage: float = 0.0
    is_demo: bool = False
    rl_weight: float = 1.0
    sft_weight: float = 0.0
    ground_truth: str | None = None
    response_text: str | None = None
    finish_reason: str = "stop"  # "stop" | "length" | "abort"
    weight_version: int = 0  # the weights the response started with
    token_versions: list[int] | None = None  # per token, when a push landed mid-response
    routed_experts: torch.Tensor | None = None  # [num_tokens - 1, MoE layers, k], routing replay
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rollout_logprobs is not None and len(self.rollout_logprobs) != len(
            self.response_ids
        ):
            raise ValueError(
                f"sample {self.prompt_id}: {len(self.rollout_logprobs)} rollout log-probs for "
                f"{len(self.response_ids)} response tokens"
            )
        if self.teacher_logprobs is not None and len(self.teacher_logprobs) != len(
            self.response_ids
        ):
            raise ValueError(
                f"sample {self.prompt_id}: {len(self.teacher_logprobs)} teacher log-probs for "
                f"{len(self.response_ids)} response tokens"
            )
        experts = self.routed_experts
        if experts is not None and (experts.dim() != 3 or experts.shape[0] != self.num_tokens - 1):
            raise ValueError(
                f"sample {self.prompt_id}: routed_experts of shape {tuple(experts.shape)}, "
                f"expected [{self.num_tokens - 1} tokens (all but the last), MoE layers, top-k]"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the routed experts as nested lists): JSON-serialisable."""
        data = dataclasses.asdict(self)
        if self.routed_experts is not None:
            data["routed_experts"] = self.routed_experts.tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Sample fields: {sorted(unknown)}")
        experts = data.get("routed_experts")
        if experts is not None and not isinstance(experts, torch.Tensor):
            data = {**data, "routed_experts": compact_expert_ids(torch.tensor(experts))}
        return cls(**data)


def compact_expert_ids(ids: torch.Tensor) -> torch.Tensor:
    """Expert ids in the smallest integer type that holds them (uint8 up to 255 experts)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 32767):
        raise ValueError(
            f"expert ids must be in [0, 32767], got {int(ids.min())}..{int(ids.max())}"
        )
    small = ids.numel() == 0 or int(ids.max()) <= 255
    return ids.to(torch.uint8 if small else torch.int16)


@dataclass
class RolloutBatch:
    """The samples of one training step, with what the driver measured while making them."""

    samples: list[Sample]
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, list[float]] = field(default_factory=dict)
    sampler_state: dict[str, Any] | None = None  # the data position before this batch was drawn

    def __len__(self) -> int:
        return len(self.samples)

    def save_jsonl(self, path: str | Path) -> None:
        """One line per sample (``step`` on each line); metrics are not saved."""
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
