"""Grading throughput: the process pool against one-by-one grading in the main process.

Builds N realistic responses from the MATH-500 / Minerva / OlympiadBench ground truths in the
benchmark data folder (``--data-root``, else ``$HPT_DATA_ROOT``, else ``data/``: as ``hpt eval``)
(a few kB of reasoning each, then: the right answer, an equivalent rewriting, a wrong answer, or
no box) and grades them both ways in the same run.

    python benchmarks/grading_throughput.py [--n 2000] [--workers 2] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from hpt_megatron.eval.benchmarks import find_data_root
from hpt_megatron.rewards import RewardPool, math_reward

FILLER = [
    "Let $x$ be the unknown. Then $x^2 - 5x + 6 = 0$, so $(x-2)(x-3) = 0$.",
    "We apply the identity $\\sin^2\\theta + \\cos^2\\theta = 1$ and simplify.",
    "Summing the series gives $\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}$.",
    "Wait, let me double-check this step: the determinant is $ad - bc$.",
    "By the AM-GM inequality, $\\frac{a+b}{2} \\ge \\sqrt{ab}$ with equality iff $a = b$.",
    "Substituting back, we get $y = 3\\cdot 4 - 7 = 5$, which is consistent.",
]


def _rewrite(answer: str, rng: random.Random) -> str:
    options = [
        answer.replace("\\frac", "\\dfrac"),
        answer.replace("(", "\\left(").replace(")", "\\right)"),
        answer.replace(",", ", ").replace("+", " + "),
        f"x = {answer}",
    ]
    return rng.choice(options)


def build_responses(n: int, data_root: str | None, seed: int = 0) -> tuple[list[str], list[str]]:
    root = find_data_root(data_root)
    answers = []
    for name in ("MATH-500.json", "Minerva.json", "Olympiad-Bench.json"):
        answers += [r["answer"] for r in json.loads((root / "eval/unify" / name).read_text())]
    rng = random.Random(seed)
    responses, truths = [], []
    for _ in range(n):
        gold = rng.choice(answers)
        body = " ".join(rng.choice(FILLER) for _ in range(rng.randint(10, 40)))
        kind = rng.random()
        if kind < 0.4:
            tail = f"\\boxed{{{gold}}}"
        elif kind < 0.6:
            tail = f"\\boxed{{{_rewrite(gold, rng)}}}"
        elif kind < 0.9:
            tail = f"\\boxed{{{rng.choice(answers)}}}"
        else:
            tail = f"so the answer is {gold}."
        responses.append(f"{body}\n\nTherefore, the final answer is {tail}")
        truths.append(gold)
    return responses, truths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--data-root")
    args = parser.parse_args()
    responses, truths = build_responses(args.n, args.data_root)

    start = time.perf_counter()
    serial = [math_reward(r, t) for r, t in zip(responses, truths)]
    serial_s = time.perf_counter() - start

    with RewardPool(num_workers=args.workers, timeout_s=args.timeout) as pool:
        pool.grade(responses[:4], truths[:4])  # start the workers outside the timing
        start = time.perf_counter()
        pooled = pool.grade(responses, truths)
        pool_s = time.perf_counter() - start
        stats = pool.stats

    agree = sum(a == b for a, b in zip(serial, pooled))
    print(f"responses: {args.n}, mean length {sum(map(len, responses)) / args.n:.0f} chars")
    print(f"correct (pool): {sum(pooled):.0f}; agreement with serial: {agree}/{args.n}")
    print(f"main process, one by one: {args.n / serial_s:8.1f} responses/s ({serial_s:.2f} s)")
    print(f"pool, {args.workers} workers: {args.n / pool_s:16.1f} responses/s ({pool_s:.2f} s)")
    print(f"ratio pool / serial: {serial_s / pool_s:.2f}x")
    print(f"timeouts {stats.timeouts}, crashes {stats.crashes}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
