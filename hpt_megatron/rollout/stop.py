"""Stop-string detection during decoding (shape legend: A = active rows, T = tokens so far)."""

from __future__ import annotations

from typing import Any

import torch


class StopStringMatcher:
    """Finds rows whose newest token completes one of ``stop_strings``.

    Only the tail of each row is decoded, one ``batch_decode`` call per step: a token decodes to at
    least one byte, so a window of (longest stop string in bytes + 2) tokens covers any match that
    ends at the newest token. Earlier matches cannot exist: the row would have stopped then.
    """

    def __init__(self, tokenizer: Any, stop_strings: list[str]) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop_strings must not contain an empty string")
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.window = max(len(s.encode("utf-8")) for s in stop_strings) + 2

    def matches(self, tokens_at: torch.Tensor) -> torch.Tensor:
        """``tokens_at``: the active rows' generated tokens; returns a bool mask ``[A]``."""
        tails = self.tokenizer.batch_decode(
            tokens_at[:, -self.window :].tolist(), skip_special_tokens=False
        )
        return torch.tensor([any(s in text for s in self.stop_strings) for text in tails])
