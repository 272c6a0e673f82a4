"""The miniature's data: the base model's task, the training task and the benchmark files.

Level 2 of the built-in arithmetic task (two-digit + and -, two-digit by one-digit *): its
training split is shuffled once (``HALF_SEED``) and cut in two halves. The base model is
pre-trained (SFT on the demonstrations) on half A; every method trains on half B. So the base
has seen every operation and partly solves the methods' prompts, with demonstrations it can read
for the rest: the paper's regime (Qwen2.5-Math on its training set, R1 traces as
demonstrations), which the regime checks of ``paper_in_miniature.py`` verify before any method
runs.

Held-out sets come from level 2's test split (disjoint from its train split; its sums from level
1's test split, which neither the base nor the methods train on), per operation: the first
``VAL_PER_OP`` of each are the validation split (the learning rate is chosen on it, and runs
validate on it over steps), the next ``ID_SIZE`` the in-distribution benchmarks (the paper's six
math benchmarks). Out of distribution: level 3 (three-digit + and -, a length
never trained, and two-digit by two-digit *, partial products never shown).
"""

from __future__ import annotations

import json
from pathlib import Path

from hpt_megatron.data.arithmetic import arithmetic_examples

TRAIN_LEVELS = [2]
HALF_SEED = 0  # the shuffle that cuts level 2's training split into halves A (base) and B
PROBE_SIZE = 256  # B's first prompts: the base's solve rates and demonstrations' NLL
TEST_SIZE = 450  # level 2's test split: validation, then the benchmarks
VAL_PER_OP = 50  # validation problems per operation
ID_SIZE = 130  # per in-distribution benchmark
OOD_SIZE = 120  # per OOD benchmark
TASK_SEED = 0  # data.arithmetic.seed: fixes the splits

ID_BENCHMARKS = {"l2_add": "+", "l2_sub": "-", "l2_mul": "*"}
OOD_BENCHMARKS = {"l3_addsub": "+-", "l3_mul": "*"}


def task_overrides(levels: list[int]) -> list[str]:
    """``hpt train`` overrides for the arithmetic task at ``levels`` with this module's splits."""
    return [
        "data.train=arithmetic",
        f"data.arithmetic.levels=[{','.join(map(str, levels))}]",
        f"data.arithmetic.test_size={TEST_SIZE}",
        f"data.arithmetic.seed={TASK_SEED}",
    ]


def row(ex) -> dict:
    return {
        "prompt": ex.messages,
        "answer": ex.ground_truth,
        "target": ex.demonstration,
        "data_source": ex.data_source,
    }


def _op(ex) -> str:
    question = ex.messages[0]["content"]
    return next(c for c in "+-*" if c in question)


def write_sets(folder: Path, per_benchmark: int | None = None) -> dict[str, Path]:
    """Write the validation split and every benchmark as JSONL; returns ``{name: path}``.

    ``per_benchmark`` keeps the first problems of each benchmark (the CI test).
    """
    folder.mkdir(parents=True, exist_ok=True)
    # Level 2's test sums are level 1's test problems (see arithmetic.py), few of them drawn:
    # the sums come from level 1's whole test split (which nothing here trains on).
    test = arithmetic_examples("test", TRAIN_LEVELS, seed=TASK_SEED, test_size=TEST_SIZE)
    pools = {
        "+": arithmetic_examples("test", [1], seed=TASK_SEED, test_size=TEST_SIZE),
        "-": [ex for ex in test if _op(ex) == "-"],
        "*": [ex for ex in test if _op(ex) == "*"],
    }
    # validation: the first VAL_PER_OP of each operation; the benchmarks: the next ID_SIZE
    sets = {"val": [ex for pool in pools.values() for ex in pool[:VAL_PER_OP]]}
    for name, op in ID_BENCHMARKS.items():
        sets[name] = pools[op][VAL_PER_OP : VAL_PER_OP + ID_SIZE]
    # level 3 is never trained; its own test split (any size) cannot meet level 2's problems
    ood = arithmetic_examples("test", [3], seed=TASK_SEED, test_size=4 * OOD_SIZE, train_size=1)
    for name, ops in OOD_BENCHMARKS.items():
        sets[name] = [ex for ex in ood if _op(ex) in ops][:OOD_SIZE]
    paths = {}
    for name, rows in sets.items():
        if per_benchmark is not None and name != "val":
            rows = rows[:per_benchmark]
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row(ex)) + "\n" for ex in rows))
        paths[name] = path
    return paths


def halves() -> tuple[list, list]:
    """Level 2's training split, shuffled with ``HALF_SEED`` and cut in two: (A, B)."""
    import random

    examples = arithmetic_examples("train", TRAIN_LEVELS, seed=TASK_SEED, test_size=TEST_SIZE)
    random.Random(HALF_SEED).shuffle(examples)
    half = len(examples) // 2
    return examples[:half], examples[half:]


def write_halves(folder: Path, probe_size: int = PROBE_SIZE) -> dict[str, Path]:
    """``base_train.jsonl`` (A), ``train.jsonl`` (B) and ``probe.jsonl`` (B's first
    ``probe_size``), with demonstrations; returns ``{name: path}``."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b = halves()
    paths = {}
    for name, rows in (("base_train", a), ("train", b), ("probe", b[:probe_size])):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row(ex)) + "\n" for ex in rows))
        paths[name] = path
    return paths


def op_of(row: dict) -> str:
    """The operation of a written row (``+``, ``-`` or ``*``)."""
    question = row["prompt"][0]["content"]
    return next(c for c in "+-*" if c in question)
