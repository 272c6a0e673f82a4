"""Deterministic, resumable batching of a prompt dataset.

Epoch ``e`` visits the dataset in the permutation drawn from ``(seed, e)``; the position is
``(epoch, offset)``, so ``state_dict()`` is two integers (plus checks) and resuming replays exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from hpt_megatron.data.records import PromptRecord


class PromptSampler:
    """An endless iterator of prompt batches, epoch after epoch.

    Args:
        dataset: The records.
        batch_size: Prompts per batch (``data.prompts_per_step``).
        seed: Seed of the per-epoch permutations.
        shuffle: Visit the records in a fresh permutation each epoch (else in file order).

    Each epoch yields ``len(dataset) // batch_size`` full batches; the remainder of a permutation
    is skipped, so every batch has exactly ``batch_size`` prompts.
    """

    def __init__(
        self,
        dataset: Sequence[PromptRecord],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"data.prompts_per_step: must be >= 1, got {batch_size}")
        if batch_size > len(dataset):
            raise ValueError(
                f"data.prompts_per_step: {batch_size} is more than the {len(dataset)} prompts "
                "in the dataset"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0  # position within the current epoch's order
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            n = len(self.dataset)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            else:
                self._order = np.arange(n)
        return self._order

    def next_batch(self) -> list[PromptRecord]:
        """The next ``batch_size`` records, advancing the position."""
        if self.offset + self.batch_size > len(self.dataset):
            self.epoch += 1
            self.offset = 0
            self._order = None
        order = self._epoch_order()
        batch = [self.dataset[int(i)] for i in order[self.offset : self.offset + self.batch_size]]
        self.offset += self.batch_size
        return batch

    def __iter__(self) -> Iterator[list[PromptRecord]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The data position, for a checkpoint."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "num_records": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a checkpoint taken on different data."""
        if state["num_records"] != len(self.dataset):
            raise ValueError(
                f"data checkpoint: it was taken on {state['num_records']} prompts, this dataset "
                f"has {len(self.dataset)}; the data (or its length filtering) changed"
            )
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError(
                f"data checkpoint: seed/shuffle {state['seed']}/{state['shuffle']} differ from "
                f"the configured {self.seed}/{self.shuffle}"
            )
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = None
