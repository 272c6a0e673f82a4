"""A reward that holds the step it grades while the file ``$HPT_TEST_GATE`` exists (imported by
the grading workers): a test can deliver a signal mid-step, however fast the machine steps."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hpt_megatron.rewards.math_grader import math_reward


def held_while_gated(response: str, ground_truth: str) -> float:
    gate = Path(os.environ["HPT_TEST_GATE"])
    if gate.exists():
        (gate.parent / "held").touch()  # the run is inside a step, its handlers installed
    while gate.exists():
        time.sleep(0.1)
    return math_reward(response, ground_truth)
