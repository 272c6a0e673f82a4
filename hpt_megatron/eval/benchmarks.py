"""The paper's benchmarks by name, mapped onto the files of a benchmark data folder
(``--data-root``, ``$HPT_DATA_ROOT``, else ``data/``: :func:`find_data_root`)."""

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


DATA_HELP = (
    "the named benchmarks read eval/unify/*.json (TsinghuaC3I/Unify-Post-Training's "
    "data/*/test.json) and eval/luffy/*.parquet (ElliottYan/LUFFY's data/*.parquet) under the "
    "data folder: pass --data-root DIR or set HPT_DATA_ROOT"
)


def find_data_root(explicit: str | Path | None = None) -> Path:
    """The benchmark data folder: ``explicit`` (``--data-root``), else ``$HPT_DATA_ROOT``, else
    ``data`` in the working directory (a checkout's own ``data/``).

    Raises:
        ValueError: naming the folder it looked in, and where that came from.
    """
    if explicit:
        root, source = Path(explicit), "--data-root"
    elif os.environ.get("HPT_DATA_ROOT"):
        root, source = Path(os.environ["HPT_DATA_ROOT"]), "$HPT_DATA_ROOT"
    else:
        root, source = Path("data"), "the default, data/ in the working directory"
    if not root.is_dir():
        raise ValueError(f"benchmark data folder {root} ({source}) does not exist; {DATA_HELP}")
    return root


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
        data_root: The benchmark data folder (see :func:`find_data_root`); unused for a file.
        reward: Override of the benchmark's reward spec.

    Raises:
        ValueError: naming the benchmark when it is unknown or its file is missing.
    """
    if name_or_path in BENCHMARKS:
        bench = BENCHMARKS[name_or_path]
        path = find_data_root(data_root) / bench.file
        if not path.is_file():
            raise ValueError(f"benchmark '{bench.name}': {path} does not exist; {DATA_HELP}")
    elif Path(name_or_path).suffix:
        path = Path(name_or_path)
        bench = Benchmark(name=path.stem, file=str(path))
        if not path.is_file():
            raise ValueError(f"benchmark file {path} does not exist")
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


def load_benchmarks(
    names: list[str], data_root: str | Path | None = None
) -> list[tuple[Benchmark, list[RawExample]]]:
    """Every benchmark of ``names`` (each once), read before any model loads; every unknown name
    or missing file is reported in one ``ValueError``."""
    loaded, problems = [], []
    for name in dict.fromkeys(names):
        try:
            loaded.append(load_benchmark(name, data_root))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("\n".join(dict.fromkeys(problems)))
    return loaded


def split_names(values: list[str]) -> list[str]:
    """``--benchmarks`` values, space- or comma-separated (``aime24 math500``, ``aime24,math500``
    or both), in order; every name that is neither a benchmark nor a file name (with a suffix)
    is reported in one ``ValueError``."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    unknown = [n for n in names if n not in BENCHMARKS and not Path(n).suffix]
    if unknown:
        raise ValueError(
            f"--benchmarks: unknown benchmark(s) {unknown}: use names of {sorted(BENCHMARKS)} "
            "or dataset files (.json, .jsonl, .parquet)"
        )
    if not names:
        raise ValueError("--benchmarks: no benchmark given")
    return names
