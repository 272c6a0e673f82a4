"""Where a step's batch comes from: generated in line (colocated) or by a background producer
under a staleness bound (disaggregated, ``run.max_staleness: k``).

Weight versions: the trainer's weights before the update of step ``s`` (0-based) are version
``s``; the engine's version is the one it last loaded. A batch generated with version ``v`` and
trained at step ``s`` has staleness ``s - v``.

:class:`InlineRollouts` (colocated): the driver generates step ``s``'s batch when the step asks
for it, after version ``s`` was loaded; staleness 0.

:class:`AsyncRollouts` (disaggregated, any ``k >= 0``): a producer thread generates the batches of
steps ``start, start + 1, ...`` in order, one after another, without waiting for the trainer,
except that it starts step ``s``'s batch only once the engine holds version ``>= s - k``. Weights
pushed after an update are queued and loaded by the producer between two batches (or before a
validation), so generation stops only for the load itself; the trainer never waits for a
generation to finish unless the batch it needs is not ready. With ``rollout.partial`` the CPU
engine also loads a push between two decode steps, so a response can continue with newer weights
(each token keeps the version and log-prob it was sampled with; the KV cache of the earlier tokens
is kept as the older weights made it, as in AReaL); SGLang's engine aborts the requests in flight
at a push, loads it, and sends each aborted one again as prompt + partial response
(``rollout/sglang/partial.py``). ``k = 0`` gives the synchronous
schedule (each batch waits for the previous step's weights: step for step the colocated run);
``k = 1`` is one step off-policy. Batches older than the trainer get decoupled PPO's correction
by default (``config.algorithm.spec(max_staleness)``).

Resume: the checkpoint after step ``t`` records the sampler position before step ``t + 1``'s
batch was drawn, so batches generated ahead of a crash are drawn and generated again, and no
prompt is trained twice or skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.data.sample import RolloutBatch
from hpt_megatron.orchestration.driver import Driver
from hpt_megatron.rollout.base import RolloutEngine, WeightBucket


def staleness_metrics(batch: RolloutBatch, step: int) -> dict[str, float]:
    """Staleness of the batch's generated rows at ``step`` (by the version each started with;
    demonstrations are not generated), and how many continued across a weight push."""
    generated = [s for s in batch.samples if not s.is_demo]
    ages = [step - s.weight_version for s in generated] or [0]  # (all demonstrations: zeros)
    versions = [set(s.token_versions or [s.weight_version]) for s in generated]
    return {
        "rollout/staleness_mean": sum(ages) / len(ages),
        "rollout/staleness_max": float(max(ages)),
        "rollout/partial_frac": sum(len(v) > 1 for v in versions) / max(1, len(generated)),
        "rollout/weight_versions": float(len(set().union(*versions))),
    }


class InlineRollouts:
    """Colocated: each step's batch is generated when asked, with the weights just loaded."""

    def __init__(self, driver: Driver | None) -> None:
        self.driver = driver

    @property
    def weight_sink(self) -> RolloutEngine | None:
        """Where the trainer's weights go after a step (the engine itself)."""
        return self.driver.engine if self.driver is not None else None

    def batch(self, step: int, spec: AlgorithmSpec) -> RolloutBatch | None:
        if self.driver is None:
            return None
        t0 = time.perf_counter()
        batch = self.driver.rollout(step, spec)
        batch.metrics["time/rollout_wait_s"] = time.perf_counter() - t0
        batch.metrics.update(staleness_metrics(batch, step))
        return batch

    def validate(self) -> dict[str, float]:
        return self.driver.evaluate() if self.driver is not None else {}

    def next_sampler_state(self, step: int) -> dict[str, Any] | None:
        """The sampler position before step ``step + 1``'s batch (checkpoint of ``step``)."""
        return self.driver.state_dict() if self.driver is not None else None

    def close(self) -> None:
        pass


class AsyncRollouts:
    """Disaggregated: a producer thread generates ahead under the staleness bound ``k``."""

    def __init__(
        self,
        driver: Driver,
        spec: AlgorithmSpec,
        start: int,
        steps: int,
        max_staleness: int,
        partial: bool = False,
    ) -> None:
        self.driver = driver
        self.spec = spec
        self.k = max_staleness
        self.steps = steps
        self._cond = threading.Condition()
        self._engine_lock = threading.Lock()  # one user of the engine at a time
        self._version = start  # the engine holds the run's starting weights (see the loop)
        # Queued weights: buckets (CPU engine) or a written folder (disk sync), and the version.
        self._pending: tuple[list[WeightBucket] | Path, int] | None = None
        self._ready: dict[int, RolloutBatch] = {}
        self._drawn_from: dict[int, dict[str, Any]] = {}  # sampler state before step s's draw
        self._error: BaseException | None = None
        self._stop = False
        self._load_s = 0.0  # seconds loading pushed weights during the current batch
        # Partial rollouts: the CPU engine calls the hook between decode steps, SGLang's before
        # each round of requests (in the producer thread); SGLang's engine is also told of each
        # push (``interrupt``) to abort the requests in flight, which it then continues.
        self._interrupt: Callable[[], None] | None = None
        if partial:
            driver.engine.decode_hook = self._load_pending  # type: ignore[attr-defined]
            self._interrupt = getattr(driver.engine, "interrupt", None)
        self._thread = threading.Thread(
            target=self._produce, args=(start,), name="hpt-rollouts", daemon=True
        )
        self._thread.start()

    # -- trainer side ---------------------------------------------------------------------------
    @property
    def weight_sink(self) -> _QueuedWeights:
        return _QueuedWeights(self)

    def batch(self, step: int, spec: AlgorithmSpec) -> RolloutBatch:
        t0 = time.perf_counter()
        with self._cond:
            while step not in self._ready:
                if self._error is not None:
                    raise RuntimeError(f"rollout producer failed: {self._error}") from self._error
                self._cond.wait(timeout=1.0)
            batch = self._ready.pop(step)
            self._drawn_from.pop(step, None)
        batch.metrics["time/rollout_wait_s"] = time.perf_counter() - t0
        batch.metrics.update(staleness_metrics(batch, step))
        return batch

    def validate(self) -> dict[str, float]:
        """Validation with the newest pushed weights (waits for the batch being generated)."""
        with self._engine_lock:
            self._load_pending()
            return self.driver.evaluate()

    def next_sampler_state(self, step: int) -> dict[str, Any]:
        with self._cond:
            state = self._drawn_from.get(step + 1)
            return state if state is not None else self.driver.state_dict()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def push(self, weights: list[WeightBucket] | Path, version: int) -> None:
        """Queue new weights (buckets, or a folder to load); the producer loads them before its
        next batch."""
        with self._cond:
            self._pending = (weights, version)
            self._cond.notify_all()
        if self._interrupt is not None:
            self._interrupt()

    # -- producer side --------------------------------------------------------------------------
    def _produce(self, start: int) -> None:
        try:
            for step in range(start, self.steps):
                t0 = time.perf_counter()
                with self._cond:
                    while not self._stop and self._newest_version() < step - self.k:
                        self._cond.wait()
                    if self._stop:
                        return
                with self._engine_lock:
                    t1 = time.perf_counter()
                    self._load_s = 0.0
                    self._load_pending()  # pushes only grow: the version is now >= step - k
                    with self._cond:  # step s's draw starts from this position (see resume)
                        self._drawn_from[step] = self.driver.state_dict()
                    batch = self.driver.rollout(step, self.spec.phase_for_step(step))
                    # What the engine side spent not generating: waiting for the staleness bound
                    # (weights) or for the engine, and loading pushed weights.
                    batch.metrics["time/producer_wait_s"] = t1 - t0
                    batch.metrics["time/producer_load_s"] = self._load_s
                with self._cond:
                    self._ready[step] = batch
                    self._cond.notify_all()
        except BaseException as err:  # surfaced to the trainer by batch()
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def _newest_version(self) -> int:
        """(cond held) The version the engine holds once the queued push is loaded."""
        return self._version if self._pending is None else max(self._version, self._pending[1])

    def _load_pending(self) -> None:
        """(engine lock held) Load the newest queued weights into the engine, if any."""
        with self._cond:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        weights, version = pending
        t0 = time.perf_counter()
        if isinstance(weights, Path):
            self.driver.engine.update_weights_from_disk(weights, version)
        else:
            self.driver.engine.update_weights(weights, version)
        self._load_s += time.perf_counter() - t0
        with self._cond:
            self._version = version


class _QueuedWeights:
    """The driver's weight target under :class:`AsyncRollouts`: queues instead of loading."""

    def __init__(self, rollouts: AsyncRollouts) -> None:
        self.rollouts = rollouts

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        # Copies: the driver's own buckets can share storage with parameters that the next
        # update changes before the producer loads them.
        owned = [[(name, t.detach().clone()) for name, t in bucket] for bucket in buckets]
        self.rollouts.push(owned, version)

    def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        # The folder stays until the engine has loaded a newer one (its disk transport).
        self.rollouts.push(Path(path), version)


def replay_file(folder: Path, step: int) -> Path:
    """The recorded batch of 0-based step ``step`` (``logging.save_rollouts`` writes it)."""
    return folder / f"step_{step + 1:06d}.jsonl"


def recorded_steps(folder: Path) -> set[int]:
    """The 1-based steps whose batch ``folder`` holds (``step_N.jsonl``)."""
    found = set()
    for path in folder.glob("step_*.jsonl"):
        number = path.stem.removeprefix("step_")
        if number.isdigit():
            found.add(int(number))
    return found


class ReplayRollouts:
    """``run.replay_rollouts``: step ``s`` trains the batch recorded for it, as it was recorded
    (prompts, responses, rollout log-probs, rewards, advantages, loss weights, weight versions);
    no engine is built and no weights are synced. The batch metrics of the recorded run (rewards,
    lengths, timings) are not recorded, so a replay logs the training metrics only."""

    weight_sink = None

    def __init__(self, folder: Path, is_driver: bool) -> None:
        self.folder = folder
        self.is_driver = is_driver

    def batch(self, step: int, spec: AlgorithmSpec) -> RolloutBatch | None:
        if not self.is_driver:
            return None
        path = replay_file(self.folder, step)
        if not path.is_file():
            raise ValueError(f"run.replay_rollouts: {path} is missing (step {step + 1})")
        batch = RolloutBatch.load_jsonl(path)
        batch.metrics.update(staleness_metrics(batch, step))
        return batch

    def validate(self) -> dict[str, float]:
        return {}  # the config rejects validation in a replay

    def next_sampler_state(self, step: int) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        pass


def make_rollouts(
    driver: Driver | None,
    spec: AlgorithmSpec,
    start: int,
    steps: int,
    placement: str,
    max_staleness: int,
    partial: bool = False,
) -> InlineRollouts | AsyncRollouts:
    """The batch source of a run (non-driver ranks get an inline one that yields None)."""
    if placement == "disaggregated" and driver is not None:
        return AsyncRollouts(driver, spec, start, steps, max_staleness, partial)
    return InlineRollouts(driver)
