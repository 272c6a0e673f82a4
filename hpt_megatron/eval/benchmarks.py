"""The paper's benchmarks by name, mapped onto the files in the shared data folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hpt_megatron.data.readers import read_examples
from hpt_megatron.data.records import RawExample


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: a file under the data root, its reward and its default sample count.

    ``data_source`` keeps only rows of that source; ``dedupe`` drops repeated prompts (the
    LUFFY files repeat AMC problems for avg@k).
    """

    name: str
    file: str
    reward: str = "math"
    k: int = 1
    data_source: str | None = None
    dedupe: bool = False


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(name="aime24", file="eval/unify/AIME24.json", k=32),
        Benchmark(name="aime25", file="eval/unify/AIME25.json", k=32),
        # the paper's AMC: 83 problems (AMC23.json has another 40-problem set)
        Benchmark(
            name="amc", file="eval/luffy/valid.parquet", k=32, data_source="amc", dedupe=True
        ),
        Benchmark(name="math500", file="eval/unify/MATH-500.json"),
        Benchmark(name="minerva", file="eval/unify/Minerva.json"),
        Benchmark(name="olympiadbench", file="eval/unify/Olympiad-Bench.json"),
        Benchmark(name="gpqa", file="eval/luffy/valid.gpqa.parquet", reward="multiple_choice"),
        Benchmark(name="arc_c", file="eval/luffy/valid.arc_c.parquet", reward="multiple_choice"),
    ]
}
MATH_BENCHMARKS = ("aime24", "aime25", "amc", "math500", "minerva", "olympiadbench")


def find_data_root(explicit: str | Path | None = None) -> Path:
    """The shared data folder: ``explicit``, ``$HPT_DATA_ROOT``, or ``../shared/data``."""
    candidates = [explicit] if explicit else []
    if os.environ.get("HPT_DATA_ROOT"):
        candidates.append(os.environ["HPT_DATA_ROOT"])
    candidates += [Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for candidate in candidates:
        if Path(candidate).is_dir():
            return Path(candidate)
    raise ValueError(
        f"benchmark data folder not found (tried {[str(c) for c in candidates]}); "
        "pass --data-root or set HPT_DATA_ROOT"
    )


def _dedupe(examples: list[RawExample]) -> list[RawExample]:
    seen: set[str] = set()
    kept = []
    for ex in examples:
        key = "\n".join(m["content"] for m in ex.messages if m["role"] == "user")
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    return kept


def load_benchmark(
    name_or_path: str, data_root: str | Path | None = None, reward: str | None = None
) -> tuple[Benchmark, list[RawExample]]:
    """A benchmark's definition and its problems.

    Args:
        name_or_path: A name in :data:`BENCHMARKS` or a dataset file (parquet/JSON/JSONL).
        data_root: The shared data folder (see :func:`find_data_root`); unused for a file.
        reward: Override of the benchmark's reward spec.

    Raises:
        ValueError: naming the benchmark when it is unknown or its file is missing.
    """
    if name_or_path in BENCHMARKS:
        bench = BENCHMARKS[name_or_path]
        path = find_data_root(data_root) / bench.file
    elif Path(name_or_path).suffix:
        path = Path(name_or_path)
        bench = Benchmark(name=path.stem, file=str(path))
    else:
        raise ValueError(
            f"unknown benchmark '{name_or_path}': use one of {sorted(BENCHMARKS)} or a file path"
        )
    if reward is not None:
        bench = Benchmark(**{**bench.__dict__, "reward": reward})
    examples, _ = read_examples(path)
    if bench.data_source is not None:
        examples = [ex for ex in examples if ex.data_source == bench.data_source]
    if bench.dedupe:
        examples = _dedupe(examples)
    if not examples:
        raise ValueError(f"benchmark '{bench.name}': no problems in {path}")
    return bench, examples
