"""examples/paper_in_miniature.py end to end on a few steps: the base stage, two methods, one
ablation, the benchmarks through hpt eval's code path, summary.json's schema and the plots."""

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
    argv += ["--eval-k", "4", "--eval-problems", "6", "--lr", "1e-3", "--seeds", "1"]
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
        # the unbiased pass@1 equals avg@k on 0/1 rewards; pass@k never falls with k
        passes = entry["pass_at_k"]
        assert len(passes) == 4 and passes[0] == pytest.approx(avg["mean"])
        assert all(a <= b + 1e-9 for a, b in zip(passes, passes[1:]))
    assert "mean" in summary["base"]["avg"] and set(summary["base"]["benchmarks"]) == benches


def test_every_method_starts_from_the_base(run):
    out, summary = run
    sr = summary["base"]["solve_rate"]
    assert sr["prompts"] == 256 and sum(sr["histogram"].values()) == 256
    expected = 100 * sum(int(k.split("/")[0]) * v for k, v in sr["histogram"].items()) / (8 * 256)
    assert sr["solve_rate"] == pytest.approx(expected)
    base_hf = out / "base" / "tiny" / "run" / "hf"
    for name in ("sft", "hpt", "always_rl"):
        config = (out / "runs" / "tiny" / name / "seed1" / "config.yaml").read_text()
        assert f"hf_weights: {base_hf}" in config
        assert "lr: 0.001" in config


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
