"""The miniature's report: ``summary.json``, ``summary.md`` (the paper's Table 2), the plots,
the regime checks and a verdict per claim.

Scores are percent. A method's ``avg`` is the mean avg@k over the in-distribution benchmarks
(the paper's "avg of six"), per seed, then mean and std (population) over seeds. The verdict
rules (``VERDICT_RULES``) are fixed here, before any run; a claim's verdict is "withheld" when any
regime check fails.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tasks import ID_BENCHMARKS, OOD_BENCHMARKS

LABELS = {
    "sft": "SFT",
    "grpo": "GRPO",
    "sft_then_grpo": "SFT -> GRPO",
    "luffy": "LUFFY",
    "hpt": "HPT",
    "hpt_paper": "HPT (paper's code)",
    "gamma_2of8": "HPT gamma=2/8",
    "always_sft": "always SFT (gamma=8/8)",
    "always_rl": "always RL (no gate)",
}


BASELINES = ("sft", "grpo", "sft_then_grpo", "luffy")
VERDICT_RULES = {
    "hpt_beats_the_best_baseline": (
        "HPT's in-distribution avg@k (mean of the seeds) against the best of SFT, GRPO, "
        "SFT->GRPO and LUFFY: more than one pooled standard deviation above: supported; within "
        "one: inconclusive; more than one below: falsified"
    ),
    "sft_share_falls": (
        "HPT's SFT-routed share of prompts, mean over its last quarter of steps, below the mean "
        "over its first quarter: supported; else falsified"
    ),
    "hpt_pass_at_k_at_least_grpo": (
        "HPT's in-distribution Pass@16 (Pass@k when k < 16) at least GRPO's: supported; else "
        "falsified"
    ),
    "gate_beats_its_ablations": (
        "HPT (gamma 0) against always SFT, always RL and gamma 2/8 (in-distribution avg@k): "
        "more than one pooled standard deviation above each: supported; more than one below "
        "any: falsified; else inconclusive"
    ),
}


def read_metrics(run_dir: Path) -> list[dict]:
    """``metrics.jsonl``, the last record of each step."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if "step" in row:
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def last_val(run_dir: Path) -> float:
    """The last greedy validation accuracy of a run, percent."""
    return 100 * [r for r in read_metrics(run_dir) if "val/accuracy" in r][-1]["val/accuracy"]


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def _seed_dirs(folder: Path) -> list[Path]:
    return sorted(folder.glob("seed*"), key=lambda p: int(p.name[4:]))


def method_entry(folder: Path, lr: dict | None = None) -> dict:
    """One method's scores over its seeds (``summary.json`` schema), plus curves; ``lr``: its
    learning-rate choice."""
    seeds = _seed_dirs(folder)
    scores = [json.loads((s / "eval" / "scores.json").read_text()) for s in seeds]
    benchmarks = {b: _stats([sc[b]["avg_at_k"] for sc in scores]) for b in scores[0]}
    metrics = [read_metrics(s) for s in seeds]
    return {
        "lr": None if lr is None else lr["lr"],
        "lr_grid": None if lr is None else lr["grid"],
        "final_val": _stats([last_val(s) for s in seeds]),
        "avg": _stats(
            [statistics.fmean(sc[b]["avg_at_k"] for b in ID_BENCHMARKS) for sc in scores]
        ),
        "benchmarks": benchmarks,
        "ood_avg": _stats(
            [statistics.fmean(sc[b]["avg_at_k"] for b in OOD_BENCHMARKS) for sc in scores]
        ),
        "greedy_avg": _stats(
            [statistics.fmean(sc[b]["greedy"] for b in ID_BENCHMARKS) for sc in scores]
        ),
        "pass_at_k": _mean_lists(
            [
                [statistics.fmean(v) for v in zip(*(sc[b]["pass_at_k"] for b in ID_BENCHMARKS))]
                for sc in scores
            ]
        ),
        "val_curve": _mean_curve(metrics, "val/accuracy"),
        "sft_fraction": _mean_curve(metrics, "gate/sft_fraction"),
        "reward_curve": _mean_curve(metrics, "reward/mean"),
    }


def _mean_lists(lists: list[list[float]]) -> list[float]:
    return [statistics.fmean(v) for v in zip(*lists)]


def _mean_curve(per_seed: list[list[dict]], key: str) -> list[list[float]]:
    """``[[step, mean over seeds], ...]`` for the steps every seed logged ``key`` at."""
    by_step: dict[int, list[float]] = {}
    for rows in per_seed:
        for r in rows:
            if key in r:
                by_step.setdefault(r["step"], []).append(r[key])
    scale = 100 if key == "val/accuracy" else 1
    return [
        [s, scale * statistics.fmean(v)]
        for s, v in sorted(by_step.items())
        if len(v) == len(per_seed)
    ]


def base_entry(base: dict) -> dict:
    sc = base["scores"]
    return {
        "steps": base["steps"],
        "rule": base["rule"],
        "demo_nll": base["demo_nll"],
        "val_greedy": base["val_greedy"],
        "avg": {"mean": statistics.fmean(sc[b]["avg_at_k"] for b in ID_BENCHMARKS)},
        "benchmarks": {b: {"mean": sc[b]["avg_at_k"]} for b in sc},
        "ood_avg": {"mean": statistics.fmean(sc[b]["avg_at_k"] for b in OOD_BENCHMARKS)},
        "greedy_avg": {"mean": statistics.fmean(sc[b]["greedy"] for b in ID_BENCHMARKS)},
        "pass_at_k": [
            statistics.fmean(v) for v in zip(*(sc[b]["pass_at_k"] for b in ID_BENCHMARKS))
        ],
        "solve_rate": base["solve_rate"],
    }


def write_all(
    out: Path, settings: dict, bases: dict, lrs: dict, methods: tuple, ablations: list[str]
) -> str:
    """Write ``summary.json``, ``summary.md`` and the plots; returns the markdown."""
    sizes = {}
    for size in settings["sizes"]:
        runs = out / "runs" / size
        names = [m for m in [*methods, *ablations] if (runs / m).is_dir()]
        sizes[size] = {
            "methods": {m: method_entry(runs / m, lrs.get(m)) for m in names if m in methods},
            "ablation": {m: method_entry(runs / m, lrs.get(m)) for m in names if m in ablations},
            "base": base_entry(bases[size]),
        }
    first = sizes[settings["sizes"][0]]
    regime = {**bases[settings["sizes"][0]]["regime"], **after_run_checks(first)}
    in_regime = all(c["pass"] for c in regime.values())
    summary = {
        "regime": regime,
        "in_regime": in_regime,
        "verdict": verdicts(first, in_regime),
        "verdict_rules": VERDICT_RULES,
        "methods": first["methods"],
        "base": first["base"],
        "ablation": first["ablation"],
        "sizes": sizes,
        "settings": settings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    import plots

    plots.write_plots(out, summary)
    text = render(summary)
    (out / "summary.md").write_text(text)
    return text


def after_run_checks(sub: dict) -> dict:
    """SFT and GRPO each beat the base's greedy validation accuracy by at least one standard
    deviation over seeds (and by something): the task can be learned from each signal."""
    checks = {}
    for name in ("sft", "grpo"):
        entry = sub["methods"].get(name)
        if entry is None:
            continue
        gain = entry["final_val"]["mean"] - sub["base"]["val_greedy"]
        ok = gain > 0 and gain >= entry["final_val"]["std"]
        checks[f"{name}_beats_base"] = {"value": gain, "pass": ok}
    return checks


def _pooled(a: dict, b: dict) -> float:
    return ((a["std"] ** 2 + b["std"] ** 2) / 2) ** 0.5


def _compare(diff: float, pooled: float) -> str:
    if diff > pooled:
        return "supported"
    if diff < -pooled:
        return "falsified"
    return "inconclusive"


def verdicts(sub: dict, in_regime: bool) -> dict:
    """A verdict per claim of ``VERDICT_RULES`` ("not run" where its runs are missing)."""
    out = dict.fromkeys(VERDICT_RULES, "not run")
    if not in_regime:
        return dict.fromkeys(VERDICT_RULES, "withheld")
    runs = {**sub["methods"], **sub["ablation"]}
    hpt = runs.get("hpt")
    if hpt is None:
        return out
    baselines = [runs[m] for m in BASELINES if m in runs]
    if baselines:
        best = max(baselines, key=lambda e: e["avg"]["mean"])
        out["hpt_beats_the_best_baseline"] = _compare(
            hpt["avg"]["mean"] - best["avg"]["mean"], _pooled(hpt["avg"], best["avg"])
        )
    frac = [v for _, v in hpt["sft_fraction"]]
    if len(frac) >= 4:
        q = len(frac) // 4
        first, last = statistics.fmean(frac[:q]), statistics.fmean(frac[-q:])
        out["sft_share_falls"] = "supported" if last < first else "falsified"
    if "grpo" in runs:
        k = min(16, len(hpt["pass_at_k"]))
        ok = hpt["pass_at_k"][k - 1] >= runs["grpo"]["pass_at_k"][k - 1]
        out["hpt_pass_at_k_at_least_grpo"] = "supported" if ok else "falsified"
    ablations = [runs[m] for m in ("always_sft", "always_rl", "gamma_2of8") if m in runs]
    if ablations:
        each = [
            _compare(hpt["avg"]["mean"] - a["avg"]["mean"], _pooled(hpt["avg"], a["avg"]))
            for a in ablations
        ]
        if "falsified" in each:
            out["gate_beats_its_ablations"] = "falsified"
        elif all(v == "supported" for v in each):
            out["gate_beats_its_ablations"] = "supported"
        else:
            out["gate_beats_its_ablations"] = "inconclusive"
    return out


def _cell(entry: dict) -> str:
    if "std" in entry and len(entry.get("per_seed", [])) > 1:
        return f"{entry['mean']:.1f} ± {entry['std']:.1f}"
    return f"{entry['mean']:.1f}"


def table(size_summary: dict, names: list[str]) -> list[str]:
    benches = [*ID_BENCHMARKS, *OOD_BENCHMARKS]
    head = ["method", *benches, "ID avg", "OOD avg", "ID greedy", "ID pass@k"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    rows = [("base", size_summary["base"])] + [
        (m, size_summary["methods"].get(m) or size_summary["ablation"][m]) for m in names
    ]
    for name, e in rows:
        cells = [_cell(e["benchmarks"][b]) for b in benches]
        cells += [_cell(e["avg"]), _cell(e["ood_avg"]), _cell(e["greedy_avg"])]
        cells.append(f"{e['pass_at_k'][-1]:.1f}")
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return lines


def render(summary: dict) -> str:
    s = summary["settings"]
    regime = "in the paper's regime" if summary["in_regime"] else "**out of regime**"
    lines = [
        "# The HPT paper in miniature",
        "",
        f"Command: `{s['command']}` ({s['wall_min']:.1f} min).",
        "",
        f"Budget per method: {s['steps']} steps x {s['prompts_per_step']} prompts x "
        f"{s['rollouts']} rollouts; seeds: {s['seeds']}; each method's learning rate chosen "
        f"over {s['lr_grid']} by its greedy validation accuracy after {s['lr_steps']} steps.",
        "",
        "Scores: avg@k (k = {k}, temperature 0.6, top-p 0.95) in percent, mean ± std over "
        "seeds; ID avg = mean of the in-distribution benchmarks (level 2 +, -, *), OOD = level 3; "
        "greedy = greedy accuracy; pass@k over the ID benchmarks.".format(k=s["eval_k"]),
        "",
        f"Benchmark sizes: {json.dumps(s['benchmarks'])}.",
        "",
        f"## Regime checks: {regime}",
        "",
        "| check | value | pass |",
        "|---|---:|---|",
        *(
            f"| {name} | {c['value']:.2f} | {'yes' if c['pass'] else 'NO'} |"
            for name, c in summary["regime"].items()
        ),
        "",
        "## Verdicts (rules fixed in report.py before any run)",
        "",
        "| claim | verdict | rule |",
        "|---|---|---|",
        *(
            f"| {claim} | {summary['verdict'][claim]} | {rule} |"
            for claim, rule in summary["verdict_rules"].items()
        ),
        "",
        "Learning rates: "
        + ", ".join(
            f"{LABELS.get(m, m)} {e['lr']:g}"
            for m, e in {**summary["methods"], **summary["ablation"]}.items()
        )
        + ".",
    ]
    for size, sub in summary["sizes"].items():
        sr = sub["base"]["solve_rate"]
        lines += [
            "",
            f"## {size}",
            "",
            f"Base model ({sub['base']['steps']} steps of SFT on half A): solves "
            f"{sr['solve_rate']:.1f}% of {sr['prompts']} of the methods' training prompts "
            f"(temperature 1, n = {sr['n']}); {sr['frac_zero']:.0f}% of prompts 0/{sr['n']}, "
            f"{sr['frac_all']:.0f}% {sr['n']}/{sr['n']}; histogram {json.dumps(sr['histogram'])}; "
            f"demonstrations' NLL per token {json.dumps(sub['base']['demo_nll'])}; greedy "
            f"validation accuracy {sub['base']['val_greedy']:.1f}.",
            "",
            *table(sub, list(sub["methods"])),
        ]
        if sub["ablation"]:
            lines += ["", "Gate ablation (HPT with gamma = 0 is the `hpt` row):", ""]
            lines += table(sub, ["hpt", *sub["ablation"]])
        hpt = sub["methods"].get("hpt")
        if hpt and hpt["sft_fraction"]:
            frac = hpt["sft_fraction"]
            n = max(1, len(frac) // 6)
            chunks = [frac[i : i + n] for i in range(0, len(frac), n)]
            lines += ["", "HPT: share of prompts routed to SFT (mean over seeds and steps):", ""]
            lines += ["| steps | SFT-routed fraction |", "|---|---:|"]
            for c in chunks:
                mean = statistics.fmean(v for _, v in c)
                lines.append(f"| {int(c[0][0])}-{int(c[-1][0])} | {mean:.3f} |")
    lines += ["", "Plots: val_curve.png, sft_fraction.png, pass_at_k.png, gate_ablation.png."]
    return "\n".join(lines) + "\n"
