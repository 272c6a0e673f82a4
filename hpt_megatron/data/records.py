"""Records that flow from dataset files to the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class RawExample:
    """One validated row of a dataset file, before templating and tokenisation.

    ``messages`` are chat messages (``{"role", "content"}``); a plain-text prompt becomes one user
    message. ``source`` and ``row`` locate the row for error messages and stable prompt ids.
    """

    messages: list[dict[str, str]]
    ground_truth: str
    demonstration: str | None = None
    data_source: str = ""
    source: str = ""
    row: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_id(self) -> str:
        return f"{self.source}:{self.row}"


@dataclass(kw_only=True)
class PromptRecord:
    """What the scheduler gets per prompt: token ids, text, ground truth, optional demonstration.

    ``demo_ids`` is the demonstration tokenised without special tokens and closed with EOS (None
    when the dataset has none). ``prompt_id`` is stable across runs for the same file and row.
    """

    prompt_id: str
    prompt_ids: list[int]
    prompt_text: str
    ground_truth: str
    data_source: str
    demo_ids: list[int] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadRow:
    """A skipped row: where it is and why."""

    file: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}: {self.reason}"


@dataclass
class ReadReport:
    """Counts from reading one file."""

    file: str
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)

    @property
    def good(self) -> int:
        return self.rows - len(self.bad)
