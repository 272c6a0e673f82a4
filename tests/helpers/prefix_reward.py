"""A reward for tests whose right answers are given by prefix: 1.0 when the response starts with
the ground truth (a non-empty text), else 0.0. Lets a test make a random model's greedy response
"correct" and a sampled one wrong, where no math answer could be."""

from __future__ import annotations


def prefix_reward(response: str, ground_truth: str) -> float:
    return float(bool(ground_truth) and response.startswith(ground_truth))
