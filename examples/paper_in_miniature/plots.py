"""The miniature's figures (matplotlib, Agg): the paper's Figures 5 and 6 and the ablation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from report import LABELS  # noqa: E402

PLOTS = ("val_curve.png", "sft_fraction.png", "pass_at_k.png", "gate_ablation.png")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_plots(out: Path, summary: dict) -> list[Path]:
    """Write :data:`PLOTS` into ``out`` (the first model size's runs)."""
    methods, base = summary["methods"], summary["base"]
    paths = [out / name for name in PLOTS]

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in methods.items():
        steps, acc = zip(*e["val_curve"]) if e["val_curve"] else ((), ())
        ax.plot(steps, acc, marker="o", label=LABELS[name])
    ax.set(xlabel="step", ylabel="validation accuracy, greedy (%)", title="Held-out over steps")
    ax.legend(fontsize=7)
    _save(fig, paths[0])

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("hpt", "hpt_paper"):
        if name in methods and methods[name]["sft_fraction"]:
            steps, frac = zip(*methods[name]["sft_fraction"])
            ax.plot(steps, frac, label=LABELS[name])
    ax.set(xlabel="step", ylabel="share of prompts routed to SFT", title="HPT's gate (Fig. 6)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _save(fig, paths[1])

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = range(1, len(base["pass_at_k"]) + 1)
    ax.plot(ks, base["pass_at_k"], "k--", label="base")
    for name, e in methods.items():
        ax.plot(ks, e["pass_at_k"], label=LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="Pass@k, in-distribution mean (%)", title="Pass@k (Fig. 5)")
    ax.legend(fontsize=7)
    _save(fig, paths[2])

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = {"hpt": methods.get("hpt"), **summary["ablation"]}
    rows = {k: v for k, v in rows.items() if v}
    labels = [LABELS[k].replace(" (", "\n(") for k in rows]
    ax.bar(
        labels,
        [v["avg"]["mean"] for v in rows.values()],
        yerr=[v["avg"]["std"] for v in rows.values()],
        capsize=3,
    )
    ax.set(ylabel="ID avg@k (%)", title="Gate ablation (HPT = gamma 0)")
    ax.tick_params(axis="x", labelsize=7)
    _save(fig, paths[3])
    return paths
