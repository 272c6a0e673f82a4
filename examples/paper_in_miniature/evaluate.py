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
            # answers scored 0 unjudged (grader timeouts, crashes, errors), greedy and sampled
            "grading": {n: g.grading[n] + s.grading[n] for n in g.grading},
        }
    done.write_text(json.dumps(scores, indent=1))
    return scores


def greedy_accuracy(model_dir: Path, prompts_file: Path, out: Path) -> float:
    """Greedy accuracy on one set, percent (as ``hpt train`` validates)."""
    engine, tokenizer = load_engine(str(model_dir))
    try:
        result = run_eval(
            engine,
            tokenizer,
            [str(prompts_file)],
            options=_options(0.0, 1.0, 1, [1], 0),
            output_dir=out,
        )
    finally:
        engine.shutdown()
    return 100 * result[0].metrics["avg"]


def demo_nll(model_dir: Path, prompts_file: Path, config: Path) -> dict[str, float]:
    """The demonstrations' negative log-likelihood per token under the model, per operation
    (nats), tokenized as ``hpt train`` tokenizes ``prompts_file`` under ``config``."""
    import torch
    from tasks import op_of
    from transformers import AutoModelForCausalLM

    from hpt_megatron.config import load_config
    from hpt_megatron.data import build_prompt_dataset
    from hpt_megatron.data.tokenizer import build_arithmetic_tokenizer

    cfg = load_config(str(config), [f"data.train={prompts_file}", "data.system_prompt=null"])
    records = list(build_prompt_dataset(cfg.data, build_arithmetic_tokenizer(), "train"))
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for rec in records:
            assert rec.demo_ids is not None, f"{rec.prompt_id}: no demonstration"
            ids = [*rec.prompt_ids, *rec.demo_ids]
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            nll = -logp[len(rec.prompt_ids) - 1 :]
            op = op_of(rows[int(rec.prompt_id.rsplit(":", 1)[1])])
            acc = sums.setdefault(op, [0.0, 0.0])
            acc[0] += float(nll.sum())
            acc[1] += len(nll)
    return {op: total / count for op, (total, count) in sorted(sums.items())}


def solve_rates(model_dir: Path, prompts_file: Path, out: Path, n: int = 8) -> dict:
    """The base model's per-prompt solve counts at temperature 1 (top-p 1), ``n`` samples each,
    and the shares of prompts at 0/n, n/n and in between (also per operation)."""
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
    from tasks import op_of

    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    ops = {f"{prompts_file.name}:{i}": op_of(r) for i, r in enumerate(rows)}
    per_op = {}
    for op in sorted(set(ops.values())):
        mine = [correct[p] for p in seen if ops.get(p) == op]
        per_op[op] = {
            "prompts": len(mine),
            "frac_zero": 100 * sum(c == 0 for c in mine) / max(1, len(mine)),
            "frac_all": 100 * sum(c == n for c in mine) / max(1, len(mine)),
        }
    return {
        "n": n,
        "prompts": total,
        "solve_rate": 100 * sum(correct.values()) / (n * total),
        "histogram": {f"{c}/{n}": hist.get(c, 0) for c in range(n + 1)},
        "frac_zero": 100 * hist.get(0, 0) / total,
        "frac_all": 100 * hist.get(n, 0) / total,
        "frac_mixed": 100 * (total - hist.get(0, 0) - hist.get(n, 0)) / total,
        "per_op": per_op,
    }


def main(argv: list[str]) -> int:
    """``evaluate.py scores MODEL SETS_DIR OUT K`` (the benchmarks) or ``evaluate.py probe MODEL
    PROMPTS OUT CONFIG VAL`` (solve rates and demonstrations' NLL on PROMPTS, greedy accuracy on
    VAL)."""
    import torch

    torch.set_num_threads(1)
    kind, model, source, out = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    if kind == "scores":
        sets = {n: source / f"{n}.jsonl" for n in ID_AND_OOD}
        evaluate(model, sets, out, int(argv[4]))
    else:
        out.mkdir(parents=True, exist_ok=True)
        probe = {
            "solve_rate": solve_rates(model, source, out / "raw"),
            "demo_nll": demo_nll(model, source, Path(argv[4])),
            "val_greedy": greedy_accuracy(model, Path(argv[5]), out / "val"),
        }
        (out / "probe.json").write_text(json.dumps(probe, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
