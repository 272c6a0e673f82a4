"""examples/paper_in_miniature.py end to end on a few steps: the base stage and its regime
checks, each method's learning-rate choice, two methods and one ablation, the benchmarks through
hpt eval's code path, summary.json's schema, the verdicts (withheld: a 30-step base is out of
the regime) and the plots; and the verdict rules on hand-made summaries."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "paper_in_miniature.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _load_script():
    spec = importlib.util.spec_from_file_location("paper_in_miniature", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_in_miniature"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    script = _load_script()
    out = tmp_path_factory.mktemp("mini")
    argv = ["--out", str(out), "--steps", "3", "--prompts-per-step", "4", "--base-steps", "30"]
    argv += ["--eval-k", "4", "--eval-problems", "6", "--seeds", "1"]
    argv += ["--lr-grid", "3e-4,1e-3", "--lr-steps", "2", "--probe-prompts", "48"]
    argv += ["--sizes", "tiny", "--methods", "sft,hpt,always_rl"]
    assert script.main(argv) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_summary_schema_and_values(run):
    out, summary = run
    assert set(summary["methods"]) == {"sft", "hpt"}
    assert set(summary["ablation"]) == {"always_rl"}
    benches = {"l2_add", "l2_sub", "l2_mul", "l3_addsub", "l3_mul"}
    for name, entry in summary["methods"].items():
        avg = entry["avg"]
        assert set(avg) == {"mean", "std", "per_seed"} and len(avg["per_seed"]) == 1
        assert set(entry["benchmarks"]) == benches
        scores = json.loads(
            (out / "runs" / "tiny" / name / "seed1" / "eval" / "scores.json").read_text()
        )
        id_mean = statistics.fmean(scores[b]["avg_at_k"] for b in ("l2_add", "l2_sub", "l2_mul"))
        assert avg["mean"] == pytest.approx(id_mean) and avg["std"] == 0.0
        for b in benches:
            assert 0.0 <= entry["benchmarks"][b]["mean"] <= 100.0
            assert scores[b]["problems"] == 6 and scores[b]["k"] == 4
            assert set(scores[b]["grading"]) == {"timeouts", "crashes", "errors"}
        # the unbiased pass@1 equals avg@k on 0/1 rewards; pass@k never falls with k
        passes = entry["pass_at_k"]
        assert len(passes) == 4 and passes[0] == pytest.approx(avg["mean"])
        assert all(a <= b + 1e-9 for a, b in zip(passes, passes[1:]))
    assert "mean" in summary["base"]["avg"] and set(summary["base"]["benchmarks"]) == benches


def test_every_method_starts_from_the_base_with_its_own_learning_rate(run):
    out, summary = run
    sr = summary["base"]["solve_rate"]
    assert sr["prompts"] == 48 and sum(sr["histogram"].values()) == 48
    expected = 100 * sum(int(k.split("/")[0]) * v for k, v in sr["histogram"].items()) / (8 * 48)
    assert sr["solve_rate"] == pytest.approx(expected)
    assert sr["frac_zero"] + sr["frac_all"] + sr["frac_mixed"] == pytest.approx(100.0)
    assert summary["base"]["steps"] == 30
    base_hf = out / "base" / "tiny" / "steps30" / "hf"
    for name in ("sft", "hpt", "always_rl"):
        entry = summary["methods"].get(name) or summary["ablation"][name]
        grid = entry["lr_grid"]
        assert set(grid) == {"0.0003", "0.001"}
        # the rule: the best final validation accuracy, a tie to the smaller rate
        best = max(sorted(grid, key=float), key=lambda lr: (grid[lr], -float(lr)))
        assert entry["lr"] == float(best)
        for lr, acc in grid.items():
            run_dir = out / "lr" / name / lr
            assert acc == pytest.approx(100 * _last_val(run_dir))
        config = (out / "runs" / "tiny" / name / "seed1" / "config.yaml").read_text()
        assert f"hf_weights: {base_hf}" in config
        assert f"lr: {entry['lr']}" in config


def _last_val(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/accuracy" in r][-1]["val/accuracy"]


def test_regime_checks_come_before_the_methods_and_withhold_every_verdict(run):
    """A 30-step base is out of the regime: the checks say which, and no claim gets a verdict."""
    out, summary = run
    regime = summary["regime"]
    pre = {"share_at_0_of_8", "share_at_8_of_8", "share_mixed"}
    pre |= {f"demo_nll_{op}" for op in "+-*"}
    assert pre | {"sft_beats_base"} <= set(regime)
    for check in regime.values():
        assert set(check) == {"value", "pass"} and isinstance(check["pass"], bool)
    # written before any method ran, and the same as in the summary
    written = json.loads((out / "regime.json").read_text())["tiny"]
    assert written == {k: v for k, v in regime.items() if k in pre}
    assert (out / "regime.json").stat().st_mtime < (out / "lr").stat().st_mtime
    assert not summary["in_regime"] and not all(c["pass"] for c in regime.values())
    assert set(summary["verdict"].values()) == {"withheld"}
    assert set(summary["verdict"]) == set(summary["verdict_rules"])


def test_verdict_rules_on_hand_made_summaries():
    sys.path.insert(0, str(REPO / "examples" / "paper_in_miniature"))
    import report

    def entry(mean, std, passk=50.0, frac=None):
        return {
            "avg": {"mean": mean, "std": std},
            "pass_at_k": [passk] * 16,
            "sft_fraction": [[i + 1, f] for i, f in enumerate(frac or [])],
        }

    sub = {
        "methods": {
            "hpt": entry(40.0, 1.0, 60.0, [0.8, 0.8, 0.6, 0.5, 0.4, 0.3, 0.3, 0.2]),
            "sft": entry(30.0, 1.0),
            "grpo": entry(38.5, 1.0, 55.0),
        },
        "ablation": {"always_sft": entry(35.0, 1.0), "always_rl": entry(39.5, 1.0)},
    }
    got = report.verdicts(sub, in_regime=True)
    assert got == {
        "hpt_beats_the_best_baseline": "supported",  # 40 - 38.5 > pooled std 1
        "sft_share_falls": "supported",  # last quarter 0.25 < first quarter 0.8
        "hpt_pass_at_k_at_least_grpo": "supported",
        "gate_beats_its_ablations": "inconclusive",  # within 1 of always RL
    }
    sub["methods"]["grpo"] = entry(42.0, 1.0, 70.0)
    sub["ablation"]["always_rl"] = entry(45.0, 1.0)
    sub["methods"]["hpt"]["sft_fraction"] = [[i, 0.5] for i in range(1, 9)]
    got = report.verdicts(sub, in_regime=True)
    assert got["hpt_beats_the_best_baseline"] == "falsified"
    assert got["sft_share_falls"] == "falsified"
    assert got["hpt_pass_at_k_at_least_grpo"] == "falsified"
    assert got["gate_beats_its_ablations"] == "falsified"
    sub["methods"]["grpo"] = entry(40.5, 1.0)
    assert report.verdicts(sub, in_regime=True)["hpt_beats_the_best_baseline"] == "inconclusive"
    assert set(report.verdicts(sub, in_regime=False).values()) == {"withheld"}


def test_gate_curve_and_plots(run):
    out, summary = run
    frac = summary["methods"]["hpt"]["sft_fraction"]
    assert [s for s, _ in frac] == [1, 2, 3] and all(0.0 <= f <= 1.0 for _, f in frac)
    assert summary["ablation"]["always_rl"]["sft_fraction"] == []  # no gate: nothing routed
    assert summary["methods"]["sft"]["val_curve"][-1][0] == 3
    for name in ("val_curve.png", "sft_fraction.png", "pass_at_k.png", "gate_ablation.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "summary.md").read_text()
    assert "| HPT |" in md and "| SFT |" in md and "always RL" in md
