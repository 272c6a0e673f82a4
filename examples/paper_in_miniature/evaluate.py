"""Scoring a trained policy through ``hpt eval``'s code path (``hpt_megatron.eval``).

The paper's protocol: temperature 0.6, top-p 0.95, avg@k over ``k`` samples per problem, and
greedy accuracy; Pass@j for j = 1..k from the same samples (the unbiased estimator).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from hpt_megatron.data.templates import PromptTemplate
from hpt_megatron.eval.cli import load_engine
from hpt_megatron.eval.runner import EvalOptions, run_eval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import ID_BENCHMARKS, OOD_BENCHMARKS  # noqa: E402

ID_AND_OOD = [*ID_BENCHMARKS, *OOD_BENCHMARKS]

TEMPLATE = PromptTemplate(kind="chat", system_prompt=None)  # as the arithmetic task's prompts
MAX_NEW_TOKENS = 64


def _options(temperature: float, top_p: float, k: int, pass_ks: list[int], seed: int):
    return EvalOptions(
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=MAX_NEW_TOKENS,
        k=k,
        pass_ks=pass_ks,
        template=TEMPLATE,
        seed=seed,
        num_workers=1,
        prompts_per_call=128,
    )


def evaluate(model_dir: Path, sets: dict[str, Path], out: Path, k: int, seed: int = 0) -> dict:
    """Greedy accuracy, avg@k and Pass@1..k on every benchmark, in percent; cached in ``out``."""
    done = out / "scores.json"
    if done.exists():
        return json.loads(done.read_text())
    engine, tokenizer = load_engine(str(model_dir))
    names = list(sets)
    files = [str(sets[n]) for n in names]
    try:
        greedy = run_eval(
            engine,
            tokenizer,
            files,
            options=_options(0.0, 1.0, 1, [1], seed),
            output_dir=out / "greedy",
        )
        sampled = run_eval(
            engine,
            tokenizer,
            files,
            options=_options(0.6, 0.95, k, list(range(1, k + 1)), seed),
            output_dir=out / "sampled",
        )
    finally:
        engine.shutdown()
    scores = {}
    for name, g, s in zip(names, greedy, sampled):
        scores[name] = {
            "avg_at_k": 100 * s.metrics["avg"],
            "greedy": 100 * g.metrics["avg"],
            "pass_at_k": [100 * s.metrics[f"pass@{j}"] for j in range(1, k + 1)],
            "k": k,
            "problems": s.num_problems,
        }
    done.write_text(json.dumps(scores, indent=1))
    return scores


def solve_rates(model_dir: Path, prompts_file: Path, out: Path, n: int = 8) -> dict:
    """The base model's per-prompt solve counts at temperature 1 (top-p 1), ``n`` samples each."""
    engine, tokenizer = load_engine(str(model_dir))
    try:
        run_eval(
            engine,
            tokenizer,
            [str(prompts_file)],
            options=_options(1.0, 1.0, n, [1], 0),
            output_dir=out,
        )
    finally:
        engine.shutdown()
    correct: Counter[str] = Counter()
    seen: set[str] = set()
    for line in (out / "responses.jsonl").read_text().splitlines():
        row = json.loads(line)
        seen.add(row["prompt_id"])
        correct[row["prompt_id"]] += row["score"] >= 0.5
    hist = Counter(correct[p] for p in seen)
    total = len(seen)
    return {
        "n": n,
        "prompts": total,
        "solve_rate": 100 * sum(correct.values()) / (n * total),
        "histogram": {f"{c}/{n}": hist.get(c, 0) for c in range(n + 1)},
        "frac_zero": 100 * hist.get(0, 0) / total,
        "frac_all": 100 * hist.get(n, 0) / total,
    }


def main(argv: list[str]) -> int:
    """``evaluate.py scores MODEL SETS_DIR OUT K`` or ``evaluate.py solve MODEL PROMPTS OUT``."""
    import torch

    torch.set_num_threads(1)
    kind, model, source, out = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    if kind == "scores":
        sets = {n: source / f"{n}.jsonl" for n in ID_AND_OOD}
        evaluate(model, sets, out, int(argv[4]))
    else:
        out.mkdir(parents=True, exist_ok=True)
        rates = solve_rates(model, source, out / "raw")
        (out / "solve_rates.json").write_text(json.dumps(rates, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
