"""Reward functions that misbehave, for the grading-pool tests (imported by worker processes)."""

import os
import time


def hang(response: str, ground_truth: str) -> float:
    """Spins, as sympy does on a power tower."""
    while True:
        pass


def blocked(response: str, ground_truth: str) -> float:
    """Waits without spending CPU (a lock, a pipe)."""
    time.sleep(3600)
    return 1.0


def crash(response: str, ground_truth: str) -> float:
    os._exit(7)


def raises(response: str, ground_truth: str) -> float:
    raise RuntimeError("grader bug")


def slow_length_reward(response: str, ground_truth: str) -> float:
    time.sleep(1.0)
    return length_reward(response, ground_truth)


def length_reward(response: str, ground_truth: str) -> float:
    return float(len(response) == int(ground_truth))


def nan_reward(response: str, ground_truth: str) -> float:
    return float("nan")


def flaky(response: str, ground_truth: str) -> float:
    """Raises on a quarter of the answers, hangs on another quarter (by response length), grades
    the rest (the fault-injection run)."""
    if len(response) % 4 == 0:
        raise RuntimeError("grader bug")
    if len(response) % 4 == 1:
        hang(response, ground_truth)
    return float(response.strip() == ground_truth.strip())
