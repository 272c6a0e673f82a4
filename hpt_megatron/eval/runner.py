"""Benchmark evaluation: sample k responses per problem with a rollout engine, grade, tabulate."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hpt_megatron.data.dataset import PromptDataset, TokenizeOptions, tokenize_examples
from hpt_megatron.data.records import RawExample
from hpt_megatron.data.templates import PromptTemplate
from hpt_megatron.eval.benchmarks import Benchmark, load_benchmarks
from hpt_megatron.eval.metrics import benchmark_scores
from hpt_megatron.rewards.pool import PoolStats, RewardPool
from hpt_megatron.rollout.base import RolloutEngine, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvalOptions:
    """The sampling protocol; the defaults are the paper's (docs/paper.md, evaluation).

    ``k`` overrides every benchmark's sample count (AIME and AMC: 32, others: 1); ``limit``
    keeps the first problems of each benchmark (smoke runs).
    """

    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    k: int | None = None
    pass_ks: list[int] = field(default_factory=lambda: [1, 8, 32])
    template: PromptTemplate = field(default_factory=PromptTemplate)
    max_prompt_tokens: int = 2048
    prompts_per_call: int = 64
    seed: int = 0
    limit: int | None = None
    num_workers: int = 2
    grade_timeout_s: float = 5.0
    progress: bool = True  # a progress bar (stderr) per benchmark while generating

    def settings(self) -> dict[str, Any]:
        """The protocol as ``summary.json`` records it."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "k": self.k,
            "pass_ks": list(self.pass_ks),
            "seed": self.seed,
            "limit": self.limit,
            "template": self.template.kind,
            "system_prompt": self.template.system_prompt,
            "max_prompt_tokens": self.max_prompt_tokens,
        }

    def validate(self) -> None:
        if self.k is not None and self.k < 1:
            raise ValueError(f"--k: must be >= 1, got {self.k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"--temperature: must be >= 0, got {self.temperature}")


@dataclass
class BenchmarkResult:
    name: str
    num_problems: int
    k: int
    metrics: dict[str, float]
    # answers scored 0 by the grading pool: past the timeout, crashed the worker, or raised
    grading: dict[str, int] = field(default_factory=lambda: asdict(PoolStats()))


def _generate(
    engine: RolloutEngine,
    dataset: PromptDataset,
    params: SamplingParams,
    per_call: int,
    bar: Any | None = None,
) -> list[list[Any]]:
    """Generations per problem, in dataset order (``bar``, a tqdm bar, counts the samples)."""
    per_problem: list[list[Any]] = [[] for _ in dataset]
    for start in range(0, len(dataset), per_call):
        chunk = [r.prompt_ids for r in dataset.records[start : start + per_call]]
        gens = engine.generate(chunk, params)
        for gen in gens:
            per_problem[start + gen.prompt_index].append(gen)
        if bar is not None:
            bar.update(len(gens))
    for i, gens in enumerate(per_problem):
        if len(gens) != params.n:
            raise RuntimeError(
                f"engine returned {len(gens)} generations for prompt {i}, not {params.n}"
            )
    return per_problem


def evaluate_benchmark(
    engine: RolloutEngine,
    tokenizer: Any,
    bench: Benchmark,
    examples: list[Any],
    pool: RewardPool,
    options: EvalOptions,
    out: Any | None = None,
) -> BenchmarkResult:
    """Sample, grade and score one benchmark; write one JSONL line per response to ``out``."""
    if options.limit is not None:
        examples = examples[: options.limit]
    dataset = tokenize_examples(
        examples,
        tokenizer,
        template=options.template,
        options=TokenizeOptions(max_prompt_tokens=options.max_prompt_tokens, overlong="truncate"),
    )
    k = options.k or bench.k
    params = SamplingParams(
        n=k,
        temperature=options.temperature,
        top_p=options.top_p,
        max_new_tokens=options.max_new_tokens,
        seed=options.seed,
    )
    logger.info("%s: %d problems x %d samples", bench.name, len(dataset), k)
    from tqdm import tqdm

    with tqdm(
        total=len(dataset) * k,
        desc=f"{bench.name} (generating)",
        unit="sample",
        disable=not options.progress,
        dynamic_ncols=True,
    ) as bar:
        generations = _generate(engine, dataset, params, options.prompts_per_call, bar)
    texts = [
        [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens]
        for gens in generations
    ]
    flat = [t for per in texts for t in per]
    truths = [r.ground_truth for r in dataset.records for _ in range(k)]
    before = replace(pool.stats)
    scores = pool.grade(flat, truths, bench.reward)
    grading = {n: v - getattr(before, n) for n, v in asdict(pool.stats).items()}
    if grading["timeouts"] or grading["crashes"]:
        logger.warning(
            "%s: %d of %d answers timed out in the grader and %d crashed it, each scored 0 "
            "(--grade-timeout is %g s; a loaded machine slows grading)",
            bench.name,
            grading["timeouts"],
            len(flat),
            grading["crashes"],
            options.grade_timeout_s,
        )
    per_problem = [scores[i * k : (i + 1) * k] for i in range(len(dataset))]
    if out is not None:
        for record, gens, outs, got in zip(dataset.records, generations, texts, per_problem):
            for j, (gen, text, score) in enumerate(zip(gens, outs, got)):
                row = {
                    "benchmark": bench.name,
                    "prompt_id": record.prompt_id,
                    "sample": j,
                    "ground_truth": record.ground_truth,
                    "response": text,
                    "score": score,
                    "finish_reason": gen.finish_reason,
                    "response_tokens": len(gen.token_ids),
                }
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    metrics = benchmark_scores(per_problem, options.pass_ks)
    return BenchmarkResult(bench.name, len(dataset), k, metrics, grading)


def run_eval(
    engine: RolloutEngine,
    tokenizer: Any,
    benchmarks: list[str],
    *,
    options: EvalOptions | None = None,
    data_root: str | Path | None = None,
    output_dir: str | Path | None = None,
    settings: dict[str, Any] | None = None,
) -> list[BenchmarkResult]:
    """Evaluate a policy (behind ``engine``) on benchmarks by name or file.

    Args:
        engine: Any :class:`RolloutEngine` (the CPU engine, SGLang).
        tokenizer: The policy's tokenizer (templates prompts, decodes responses).
        benchmarks: Names from :data:`hpt_megatron.eval.benchmarks.BENCHMARKS` or file paths.
        options: The sampling protocol (default: the paper's).
        data_root: The benchmark data folder for named benchmarks.
        output_dir: Where ``responses.jsonl`` (every response and score) and ``summary.json``
            go; None writes nothing.
        settings: More settings for ``summary.json`` (the CLI's model and engine).

    Returns:
        One result per benchmark, in order.
    """
    loaded = load_benchmarks(benchmarks, data_root)  # fail before generating
    return evaluate_loaded(
        engine, tokenizer, loaded, options=options, output_dir=output_dir, settings=settings
    )


def evaluate_loaded(
    engine: RolloutEngine,
    tokenizer: Any,
    loaded: list[tuple[Benchmark, list[RawExample]]],
    *,
    options: EvalOptions | None = None,
    output_dir: str | Path | None = None,
    settings: dict[str, Any] | None = None,
) -> list[BenchmarkResult]:
    """:func:`run_eval` on benchmarks already read (``load_benchmarks``: ``hpt eval`` reads them
    before it loads the model)."""
    options = options or EvalOptions()
    options.validate()
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with RewardPool(num_workers=options.num_workers, timeout_s=options.grade_timeout_s) as pool:
        out = open(out_dir / "responses.jsonl", "w") if out_dir else None  # noqa: SIM115
        try:
            for bench, examples in loaded:
                results.append(
                    evaluate_benchmark(engine, tokenizer, bench, examples, pool, options, out)
                )
        finally:
            if out is not None:
                out.close()
    if out_dir is not None:
        summary = summary_rows(results, {**(settings or {}), **options.settings()})
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return results


def mean_metrics(results: list[BenchmarkResult]) -> dict[str, float]:
    """Each metric's mean over the benchmarks that report it (avg@k over all of them)."""
    names = {m for r in results for m in r.metrics}
    return {
        m: sum(have) / len(have)
        for m in sorted(names, key=lambda m: (m != "avg", len(m), m))
        for have in [[r.metrics[m] for r in results if m in r.metrics]]
    }


def summary_rows(results: list[BenchmarkResult], settings: dict[str, Any]) -> list[dict]:
    """``summary.json``: a row per benchmark, then their ``mean``; each row carries the
    settings it was evaluated with (``k`` there: the override, None for the benchmarks' own)."""
    rows = [{**r.__dict__, "settings": settings} for r in results]
    mean = {
        "name": "mean",
        "num_problems": sum(r.num_problems for r in results),
        "k": None,
        "metrics": mean_metrics(results),
        "grading": {f.name: sum(r.grading[f.name] for r in results) for f in fields(PoolStats)},
        "settings": settings,
    }
    return [*rows, mean]


def format_table(results: list[BenchmarkResult]) -> str:
    """A plain-text table: one row per benchmark (avg@k, pass@j) and their mean."""
    columns = sorted(
        {m for r in results for m in r.metrics if m != "avg"}, key=lambda m: int(m[5:])
    )
    header = ["benchmark", "problems", "k", "avg@k", *columns]
    rows = [
        [r.name, str(r.num_problems), str(r.k), f"{100 * r.metrics['avg']:.1f}"]
        + [f"{100 * r.metrics[c]:.1f}" if c in r.metrics else "-" for c in columns]
        for r in results
    ]
    if len(results) > 1:
        means = mean_metrics(results)
        mean = [means["avg"], *(means[c] for c in columns)]
        rows.append(
            [
                "mean",
                str(sum(r.num_problems for r in results)),
                "",
                *(f"{100 * v:.1f}" for v in mean),
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
