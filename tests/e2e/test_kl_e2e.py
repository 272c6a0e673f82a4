"""``hpt train`` with a KL penalty against the reference policy, in both modes, on the tiny CPU
config (one process): ``kl_ref_mean`` is 0 at step 1 and grows, a large coefficient keeps the
policy closer to the reference, and a resumed run finds the same reference again."""

from __future__ import annotations

import pathlib

import pytest

from tests.helpers import hpt_train
from tests.helpers.forked import run_cli

TINY = hpt_train.TINY
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
BASE = [
    "parallel.tp=1",
    "run.val_every=0",
    "data.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=24",
    "logging.progress_bar=false",
    "reward.num_workers=1",
    "checkpoint.save_every=0",
    # srft: demonstrations in the RL term move the policy even while every rollout fails.
    "algorithm.preset=srft",
    "trainer.warmup_steps=0",
    "trainer.lr_schedule=constant",
]


def _train(out: pathlib.Path, steps: int, *extra: str) -> dict[int, dict]:
    argv = ["train", TINY, f"run.output_dir={out}", f"run.steps={steps}", *BASE, *extra]
    code, output = run_cli(argv, out.parent / f"{out.name}.log")
    assert code == 0, output[-5000:]
    return hpt_train.metrics(out)


@pytest.mark.parametrize("mode", ["loss", "reward"])
def test_kl_ref_is_zero_at_the_start_and_grows(tmp_path, mode):
    metrics = _train(
        tmp_path / mode, 5, "algorithm.options.kl_coef=0.01", f"algorithm.options.kl_mode={mode}"
    )
    kl = [metrics[s]["kl_ref_mean"] for s in range(1, 6)]
    assert kl[0] == 0.0 and metrics[1]["kl_ref_max"] == 0.0  # the reference is the start
    assert all(k > 0 for k in kl[1:]) and max(kl[3:]) > kl[1]
    assert all(metrics[s]["kl_ref_max"] >= metrics[s]["kl_ref_mean"] for s in metrics)
    assert all(metrics[s]["time/ref_s"] > 0 for s in metrics)


def test_a_large_coefficient_stays_closer_to_the_reference(tmp_path):
    # A negligible coefficient stands in for "no penalty" (the reference is built only with one).
    free = _train(tmp_path / "free", 5, "algorithm.options.kl_coef=1e-9")
    held = _train(tmp_path / "held", 5, "algorithm.options.kl_coef=1.0")
    assert held[5]["kl_ref_mean"] < 0.75 * free[5]["kl_ref_mean"]  # measured: 0.080 vs 0.146


def test_resumed_run_uses_the_same_reference(tmp_path):
    """The initial random weights are the reference; a resumed run loads them from the run
    folder, so it continues exactly like the uninterrupted run."""
    extra = ["algorithm.options.kl_coef=0.01", "checkpoint.save_every=2"]
    full = _train(tmp_path / "full", 4, *extra)
    _train(tmp_path / "part", 2, *extra)
    resumed = _train(tmp_path / "part", 4, *extra)
    assert (tmp_path / "part" / "reference").is_dir()
    for step in (3, 4):
        for key in ("kl_ref_mean", "kl_ref_max", "loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-6), (step, key)
