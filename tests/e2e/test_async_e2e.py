"""Asynchronous training (``run.placement: disaggregated``, ``run.max_staleness: k``) end to end:
k = 0 through the background producer equals the colocated run step for step; a k = 2 run stays
within its bound with the off-policy correction active; a SIGKILLed k = 2 run resumes and trains
every prompt of the data order exactly once."""

from __future__ import annotations

import collections

import pytest

from hpt_megatron.data.sample import RolloutBatch
from tests.e2e.test_train_e2e import _kill_after, _run
from tests.helpers import hpt_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # whole `hpt train` runs

ASYNC = ["run.placement=disaggregated", "parallel.tp=2", "run.val_every=0"]
SAME = ["reward/mean", "gate/sft_fraction", "loss", "grad_norm", "response/length_mean"]


def _prompts_per_step(out) -> dict[int, collections.Counter]:
    """The prompt ids each step trained on (from ``logging.save_rollouts``)."""
    batches = [RolloutBatch.load_jsonl(p) for p in sorted((out / "rollouts").glob("step_*.jsonl"))]
    return {b.step: collections.Counter(s.prompt_id for s in b.samples) for b in batches}


def test_staleness_zero_through_the_producer_equals_colocated(tmp_path):
    # One generation thread in both (auto gives colocated runs the idle rank's core too, which
    # may change float rounding in sampling), and one engine (data-parallel generation samples
    # each rank's share with its own seed).
    colo, k0 = tmp_path / "colocated", tmp_path / "k0"
    one_engine = ["rollout.cpu.threads=1", "rollout.cpu.data_parallel=false"]
    _run(colo, 2, 3, "parallel.tp=2", "run.val_every=0", *one_engine)
    _run(k0, 2, 3, *ASYNC, "run.max_staleness=0", "rollout.cpu.threads=1")
    want, got = hpt_train.metrics(colo), hpt_train.metrics(k0)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step]["rollout/staleness_max"] == 0.0
        for key in SAME:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-9), (step, key)


@pytest.mark.slow
def test_staleness_two_bounded_corrected_and_resumes_without_loss(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = [
        *ASYNC,
        "run.max_staleness=2",
        "algorithm.preset=luffy",  # demonstrations in every group: updates from step 1
        "algorithm.options.tis_cap=1.0",  # any ratio above 1 is truncated: the share shows it
        "trainer.warmup_steps=0",  # the first update changes the weights
        "logging.save_rollouts=true",
    ]
    _run(full, 2, 6, *extra)
    metrics = hpt_train.metrics(full)
    assert sorted(metrics) == list(range(1, 7))
    staleness = [metrics[s]["rollout/staleness_max"] for s in range(1, 7)]
    assert max(staleness) <= 2 and staleness[1] >= 1, staleness
    stale_steps = [s for s in range(1, 7) if metrics[s]["rollout/staleness_max"] > 0]
    assert any(metrics[s]["tis_clip_frac"] > 0 for s in stale_steps)
    assert all(metrics[s]["mismatch/logp_abs_diff_mean"] > 1e-4 for s in stale_steps)

    # SIGKILL after step 3 (batches of later steps were generated ahead), then resume.
    _kill_after(killed, 6, *extra, kill_at=3)
    assert 6 not in hpt_train.metrics(killed)
    _run(killed, 2, 6, *extra)
    assert sorted(hpt_train.metrics(killed)) == list(range(1, 7))
    want, got = _prompts_per_step(full), _prompts_per_step(killed)
    assert sorted(got) == sorted(want) == list(range(6))
    assert got == want  # every step trained the same prompts: none lost, none twice
    trained = sum((c for c in got.values()), collections.Counter())
    # 6 steps x 4 distinct prompts, each a group of rollout.n = 4: LUFFY's 3 rollouts and its
    # demonstration (the official n - 1 + 1, algorithm.options.demos_replace_rollouts)
    assert len(trained) == 6 * 4 and set(trained.values()) == {3 + 1}
