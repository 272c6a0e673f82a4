"""Benchmark evaluation (avg@k, pass@k) through any rollout engine; ``hpt eval``."""

from hpt_megatron.eval.benchmarks import BENCHMARKS, Benchmark, load_benchmark
from hpt_megatron.eval.metrics import benchmark_scores, pass_at_k
from hpt_megatron.eval.runner import BenchmarkResult, EvalOptions, format_table, run_eval

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkResult",
    "EvalOptions",
    "benchmark_scores",
    "format_table",
    "load_benchmark",
    "pass_at_k",
    "run_eval",
]
