"""Every seed a run's rollouts use, derived from ``run.seed`` by :func:`derive_seed`.

- ``sampler``: the prompt sampler's order (``data/sampler.py``): ``seed``.
- ``engine_init``: the CPU engine's random start weights (the trainer's overwrite them at step 0):
  ``seed``.
- ``rollout``: step ``step``'s sampling (a resumed run draws the same samples):
  ``seed * 100_003 + step``.
- ``replica``: replica ``rank``'s share of one call under data-parallel generation:
  ``seed * 1_000_003 + rank``.
- ``sample``: an SGLang server's ``sampling_seed`` for the ``rank``-th response of one call:
  ``(seed * 1_000_003 + rank) % 2**31``.

- ``validation``: every sampled validation (``run.val_temperature > 0``), the same draws each
  time so that checkpoints compare on equal terms: ``seed * 100_003 + 100_002`` (the rollout
  seed of a step no run reaches). Greedy validation (the default) draws nothing.

``replica`` and ``sample`` mix the seed of one ``generate`` call (``SamplingParams.seed``, itself
``rollout``'s or ``validation``'s), which is what the engine holds.
"""

from __future__ import annotations

from typing import Literal

Purpose = Literal["sampler", "engine_init", "rollout", "replica", "sample", "validation"]

_STEP_STRIDE = 100_003  # primes: distinct (seed, step) and (seed, rank) pairs do not collide
_RANK_STRIDE = 1_000_003
_SERVER_SEED_LIMIT = 2**31  # SGLang's sampling_seed is a 32-bit signed int


def derive_seed(seed: int, purpose: Purpose, step: int = 0, rank: int = 0) -> int:
    """The seed of ``purpose`` at ``step`` for ``rank`` (see the module's table)."""
    if purpose in ("sampler", "engine_init"):
        return seed
    if purpose == "rollout":
        return seed * _STEP_STRIDE + step
    if purpose == "validation":
        return seed * _STEP_STRIDE + _STEP_STRIDE - 1
    if purpose == "replica":
        return seed * _RANK_STRIDE + rank
    if purpose == "sample":
        return (seed * _RANK_STRIDE + rank) % _SERVER_SEED_LIMIT
    raise ValueError(f"unknown seed purpose {purpose!r}")
