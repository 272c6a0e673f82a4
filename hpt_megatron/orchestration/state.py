"""Run state in a checkpoint: step, data position, RNG; choosing the checkpoint to resume from."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpt_megatron.trainer.checkpoint import list_checkpoints, verify_checkpoint

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].tolist(),
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.seed(0)
    np_state = list(np.random.get_state())
    np_state[1] = np.array(state["numpy"], dtype=np.uint32)
    np.random.set_state(tuple(np_state))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def choose_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``never``, a path, or ``auto`` (newest intact one)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        problem = verify_checkpoint(path)
        if problem:
            raise ValueError(f"run.resume: {path} cannot be resumed from: {problem}")
        return path
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is unusable (%s); falling back to an older one", path, problem)
    return None
