"""The order of the named calls of one step of ``orchestration/loop.StepLoop``: rollout (the
driver's generation and batch rule), update, weight push, validation, save, metrics, with small
fakes that record what they are called with (the real components are tested elsewhere)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest

from hpt_megatron.orchestration.loop import LoopParts, StepLoop


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def __call__(self, name: str, arg: Any = None) -> None:
        self.events.append((name, arg))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


class FakeTrainer:
    """``version`` counts the updates: what the push and the save see tells their order."""

    def __init__(self, record: Recorder) -> None:
        self.record = record
        self.version = 0
        self.last_complete = None

    def step(self, samples: list, spec: Any, step: int) -> dict[str, float]:
        self.version += 1
        self.record("update", (step, samples))
        return {"loss": 0.5, "grad_norm": 1.0}

    def poll(self) -> None:
        pass

    def save(self, step: int, score: float | None, sampler: Any, force: bool) -> bool:
        self.record("save", (step, self.version, score, sampler, force))
        return True

    def take_staging_wait(self) -> float:
        return 0.0


class FakeRollouts:
    def __init__(self, record: Recorder, trainer: FakeTrainer) -> None:
        self.record = record
        self.trainer = trainer
        self.weight_sink = "engine"

    def batch(self, step: int, spec: Any) -> Any:
        self.record("rollout", (step, self.trainer.version))
        samples = [f"sample-{step}"]
        return SimpleNamespace(samples=samples, metrics={"reward/mean": 1.0}, histograms={})

    def validate(self) -> dict[str, float]:
        self.record("validate", self.trainer.version)
        return {"val/accuracy": 0.25 * self.trainer.version}

    def next_sampler_state(self, step: int) -> dict[str, int]:
        return {"drawn": step + 1}

    def close(self) -> None:
        pass


class FakePusher:
    def __init__(self, record: Recorder, trainer: FakeTrainer) -> None:
        self.record = record
        self.trainer = trainer

    def push(self, rollouts: Any, version: int) -> None:
        self.record("push", (version, self.trainer.version, rollouts.weight_sink))


class FakeLogger:
    def __init__(self, record: Recorder) -> None:
        self.record = record

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.record("metrics", (step, dict(metrics)))

    def histogram(self, step: int, key: str, values: list[float]) -> None:
        pass


class FakeSpec:
    def phase_for_step(self, step: int) -> FakeSpec:
        return self


def _loop(steps: int, val_every: int = 1, stop_after: int | None = None):
    record = Recorder()
    trainer = FakeTrainer(record)
    cfg = SimpleNamespace(
        run=SimpleNamespace(steps=steps, val_every=val_every, run_dir="unused"),
        logging=SimpleNamespace(save_rollouts=False),
        fault=SimpleNamespace(max_nonfinite_steps=3),
    )
    ctx = SimpleNamespace(world_size=1, is_driver=True)
    calls = {"agreed": 0}

    def agreed(ctx: Any) -> bool:
        calls["agreed"] += 1
        return stop_after is not None and calls["agreed"] > stop_after

    preemption = SimpleNamespace(agreed=agreed, requested="SIGTERM")
    parts = LoopParts(
        trainer=trainer,
        rollouts=FakeRollouts(record, trainer),
        pusher=FakePusher(record, trainer),
        logger=FakeLogger(record),
        preemption=preemption,  # type: ignore[arg-type]
        phase=lambda name, step=None: contextlib.nullcontext(),
    )
    return StepLoop(cfg, ctx, FakeSpec(), parts), record  # type: ignore[arg-type]


STEP = ["rollout", "update", "push", "validate", "save", "metrics"]


def test_each_step_is_rollout_update_push_validate_save_metrics_in_that_order():
    loop, record = _loop(steps=3)
    metrics, preempted = loop.run(start=0)
    assert record.names() == STEP * 3
    assert not preempted
    assert metrics["loss"] == 0.5 and metrics["val/accuracy"] == 0.75


def test_each_call_sees_the_state_the_order_implies():
    loop, record = _loop(steps=2)
    loop.run(start=0)
    by_step = [record.events[i : i + len(STEP)] for i in range(0, len(record.events), len(STEP))]
    for step, events in enumerate(by_step):
        seen = dict(events)
        assert seen["rollout"] == (step, step)  # generated with the previous step's weights
        assert seen["update"] == (step, [f"sample-{step}"])  # on the batch just generated
        assert seen["push"] == (step + 1, step + 1, "engine")  # the weights just updated
        assert seen["validate"] == step + 1  # scores the weights just pushed
        score = 0.25 * (step + 1)
        assert seen["save"] == (step + 1, step + 1, score, {"drawn": step + 1}, False)
        logged_step, logged = seen["metrics"]
        assert logged_step == step + 1
        assert logged["reward/mean"] == 1.0 and logged["loss"] == 0.5
        assert logged["val/accuracy"] == score
        assert {"time/weight_sync_s", "time/checkpoint_blocked_s", "time/step_s"} <= set(logged)


def test_without_validation_the_save_follows_the_push():
    loop, record = _loop(steps=2, val_every=0)
    loop.run(start=1)
    assert record.names() == ["rollout", "update", "push", "save", "metrics"]
    assert record.events[3][1][2] is None  # no score


@pytest.mark.parametrize("stop_after", [0, 1])
def test_a_signal_forces_a_save_and_stops_after_that_step(stop_after, capsys):
    loop, record = _loop(steps=5, stop_after=stop_after)
    _, preempted = loop.run(start=0)
    assert preempted
    assert record.names() == STEP * (stop_after + 1)
    saves = [arg for name, arg in record.events if name == "save"]
    assert [force for *_, force in saves] == [False] * stop_after + [True]
    assert f"stopped by SIGTERM after step {stop_after + 1}" in capsys.readouterr().out
