"""The miniature's report: ``summary.json``, ``summary.md`` (the paper's Table 2) and the plots.

Scores are percent. A method's ``avg`` is the mean avg@k over the in-distribution benchmarks
(the paper's "avg of six"), per seed, then mean and std (population) over seeds.
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


def method_entry(folder: Path) -> dict:
    """One method's scores over its seeds (``summary.json`` schema), plus curves."""
    seeds = _seed_dirs(folder)
    scores = [json.loads((s / "eval" / "scores.json").read_text()) for s in seeds]
    benchmarks = {b: _stats([sc[b]["avg_at_k"] for sc in scores]) for b in scores[0]}
    metrics = [read_metrics(s) for s in seeds]
    return {
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
        "avg": {"mean": statistics.fmean(sc[b]["avg_at_k"] for b in ID_BENCHMARKS)},
        "benchmarks": {b: {"mean": sc[b]["avg_at_k"]} for b in sc},
        "ood_avg": {"mean": statistics.fmean(sc[b]["avg_at_k"] for b in OOD_BENCHMARKS)},
        "greedy_avg": {"mean": statistics.fmean(sc[b]["greedy"] for b in ID_BENCHMARKS)},
        "pass_at_k": [
            statistics.fmean(v) for v in zip(*(sc[b]["pass_at_k"] for b in ID_BENCHMARKS))
        ],
        "solve_rate": base["solve_rate"],
    }


def write_all(out: Path, settings: dict, bases: dict, methods: tuple, ablations: list[str]) -> str:
    """Write ``summary.json``, ``summary.md`` and the plots; returns the markdown."""
    sizes = {}
    for size in settings["sizes"]:
        runs = out / "runs" / size
        names = [m for m in [*methods, *ablations] if (runs / m).is_dir()]
        sizes[size] = {
            "methods": {m: method_entry(runs / m) for m in names if m in methods},
            "ablation": {m: method_entry(runs / m) for m in names if m in ablations},
            "base": base_entry(bases[size]),
        }
    first = sizes[settings["sizes"][0]]
    summary = {
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


def _cell(entry: dict) -> str:
    if "std" in entry and len(entry.get("per_seed", [])) > 1:
        return f"{entry['mean']:.1f} ± {entry['std']:.1f}"
    return f"{entry['mean']:.1f}"


def table(size_summary: dict, names: list[str]) -> list[str]:
    benches = [*ID_BENCHMARKS, *OOD_BENCHMARKS]
    head = ["method", *benches, "ID avg", "OOD avg", "ID greedy", "ID pass@32"]
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
    lr = s["lr"]
    lines = [
        "# The HPT paper in miniature",
        "",
        f"Command: `{s['command']}` ({s['wall_min']:.1f} min).",
        "",
        f"Budget per method: {s['steps']} steps x {s['prompts_per_step']} prompts x "
        f"{s['rollouts']} rollouts; seeds: {s['seeds']}; learning rate {lr['lr']:g} for every "
        f"method ({lr['how']}; validation accuracy per grid value: {json.dumps(lr['grid'])}).",
        "",
        "Scores: avg@k (k = {k}, temperature 0.6, top-p 0.95) in percent, mean ± std over "
        "seeds; ID avg = mean of the in-distribution benchmarks (level 2 +, -, *), OOD = level 3; "
        "greedy = greedy accuracy; pass@32 over the ID benchmarks.".format(k=s["eval_k"]),
        "",
        f"Benchmark sizes: {json.dumps(s['benchmarks'])}.",
    ]
    for size, sub in summary["sizes"].items():
        sr = sub["base"]["solve_rate"]
        lines += [
            "",
            f"## {size}",
            "",
            f"Base model: solves {sr['solve_rate']:.1f}% of {sr['prompts']} training prompts "
            f"(temperature 1, n = {sr['n']}); {sr['frac_zero']:.0f}% of prompts 0/{sr['n']}, "
            f"{sr['frac_all']:.0f}% {sr['n']}/{sr['n']}; histogram {json.dumps(sr['histogram'])}.",
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
