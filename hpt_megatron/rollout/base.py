"""The rollout-engine protocol (docs/architecture.md (Contracts))."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)  # EOS is always a stop
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(kw_only=True)
class Generation:
    """One response: ``prompt_index`` into the request's prompt list.

    ``logprobs`` are the raw model's log-probs of ``token_ids`` (temperature 1, no top-k/top-p),
    the quantity the trainer recomputes as pi_old. ``sampling_logprobs``, when an engine reports
    them, are under the distribution the tokens were drawn from (after temperature, top-k, top-p);
    they equal ``logprobs`` at temperature 1 without truncation. ``weight_version`` is the
    version the response started with; ``token_versions``, the version each token was sampled
    with, are reported only when they differ (a partial rollout's weight push landed mid-response).
    ``routed_experts`` (engines that record routing, for routing replay): the experts each MoE
    router chose, ``[prompt + response tokens - 1, MoE layers, top-k]`` (``Sample``'s layout).
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: int = 0
    sampling_logprobs: list[float] | None = None
    token_versions: list[int] | None = None
    routed_experts: torch.Tensor | None = None


WeightBucket = list[tuple[str, torch.Tensor]]  # (Hugging Face name, full tensor)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the scheduler needs from a generation backend."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Return ``params.n`` generations per prompt, grouped by prompt in prompt order."""
        ...

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """Load new policy weights, given as buckets of HF-named full tensors."""
        ...

    def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        """Load new policy weights from an HF safetensors folder (disk weight sync)."""
        ...

    def release_memory(self) -> None: ...

    def resume_memory(self) -> None: ...

    def health(self) -> bool: ...

    @property
    def restarts(self) -> int:
        """Servers restarted after a crash so far (0 for an in-process engine)."""
        ...

    def shutdown(self) -> None: ...
