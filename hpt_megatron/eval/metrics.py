"""avg@k and the unbiased pass@k estimator (Chen et al., 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn from ``n`` (``c`` correct) is correct.

    ``1 - C(n - c, k) / C(n, k)``, computed as a stable product.
    """
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def benchmark_scores(
    scores_per_problem: Sequence[Sequence[float]], pass_ks: Sequence[int]
) -> dict[str, float]:
    """``avg@k`` (mean score over all samples) and ``pass@j`` for each ``j <= k`` in ``pass_ks``.

    A sample counts as correct for pass@k when its score is at least 0.5.
    """
    n = min(len(s) for s in scores_per_problem)
    result = {"avg": float(np.mean([np.mean(s) for s in scores_per_problem]))}
    for k in pass_ks:
        if k <= n:
            result[f"pass@{k}"] = float(
                np.mean(
                    [pass_at_k(len(s), sum(x >= 0.5 for x in s), k) for s in scores_per_problem]
                )
            )
    return result
