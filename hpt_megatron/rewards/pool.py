"""Grading many responses in worker processes, each answer bounded by a timeout.

A reward function can hang (sympy on a power tower) or crash (a segfault in a parser, memory
exhaustion). Here each answer runs in a worker process; an answer that passes its deadline or kills
its worker scores 0, the worker is replaced and the rest of the batch goes on. This works from any
thread, unlike signal-based timeouts.

The deadline counts the worker's CPU time on the answer (``timeout_s``), so a machine too loaded
to give the worker a core does not score a correct answer 0 (a loaded evaluation once lost 49 of
them to a wall-clock deadline); an answer that waits without spending CPU is cut at
``WALL_FACTOR`` x ``timeout_s`` of wall time. Where ``/proc`` is missing the wall clock alone
counts.

Workers come from a ``forkserver`` that has imported the built-in graders, so replacing one takes
milliseconds rather than a fresh interpreter's start-up.

Signals. The workers ignore the signals a run may take as a preemption (``IGNORED_SIGNALS``, a
superset of ``config.fault.SIGNALS``): Slurm signals every process of a job step, torchrun signals
each rank's process group, a terminal's Ctrl-C the foreground group. The rank decides what the
signal means (``orchestration/faults.py``: finish the step, checkpoint, exit), so the step's
answers are still graded rather than scored 0. The forkserver is multiprocessing's, shared by the
whole process, so it keeps its handlers; when a signal kills it, the next worker's start meets a
dying forkserver and is retried until multiprocessing has started another. A worker exits when the
rank closes its pipe, and a finalizer kills the workers when the rank's interpreter exits without
:meth:`RewardPool.close` (multiprocessing would otherwise SIGTERM them and wait forever).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing as mp
import multiprocessing.util
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from hpt_megatron.rewards.registry import import_path_of

logger = logging.getLogger(__name__)

_PREFETCH = 2  # tasks queued per worker, so it never waits for the main process
_SPAWN_TRIES = 100  # a worker's start, 0.1 s apart, while a killed forkserver goes away
WALL_FACTOR = 4.0  # an answer's wall-clock bound, in timeouts (its CPU bound is one)
_PROC = os.path.exists(f"/proc/{os.getpid()}/stat")  # Linux: workers' CPU times readable
_TICK = os.sysconf("SC_CLK_TCK") if _PROC else 100
_PRELOAD = ["hpt_megatron.rewards._warm", "hpt_megatron.rewards.multiple_choice"]
IGNORED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


def _worker_main(conn: Connection, memory_limit_mb: int | None) -> None:
    """Worker loop: receive ``(index, spec, response, ground_truth)``, send ``(index, score)``.

    A preemption signal reaches the rank's whole process group (or, under Slurm, every process of
    the step): the rank decides what it means and closes the pool; the worker ignores it."""
    for name in IGNORED_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from hpt_megatron.rewards.registry import resolve_reward

    cache: dict[str, Any] = {}
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, spec, response, ground_truth = task
        raised = False
        try:
            fn = cache.get(spec) or cache.setdefault(spec, resolve_reward(spec))
            score = float(fn(response, ground_truth))
        except Exception:  # a failing grader costs this answer only
            score, raised = 0.0, True
        conn.send((index, score, raised))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    # tasks sent and not answered, in order; the worker is grading the first one
    inflight: collections.deque[int] = field(default_factory=collections.deque)
    deadline: float = 0.0  # when to look at the first in-flight task again
    started: float = 0.0  # when the worker began it (wall clock)
    cpu0: float = 0.0  # the worker's CPU seconds then

    def begin(self, timeout_s: float) -> None:
        """The first in-flight task starts now; look at it again after ``timeout_s``."""
        self.started, self.cpu0 = time.monotonic(), _cpu_seconds(self.process.pid)
        self.deadline = self.started + timeout_s


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (0.0 once it is gone or without ``/proc``)."""
    if not _PROC:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class PoolStats:
    """Counts of answers that timed out, crashed their worker or raised in the reward function,
    since the pool started (each scored 0)."""

    timeouts: int = 0
    crashes: int = 0
    errors: int = 0


class RewardPool:
    """A pool of grading processes with a per-answer timeout.

    Args:
        num_workers: Worker processes.
        timeout_s: CPU seconds one answer may take before it scores 0 and its worker is replaced
            (``WALL_FACTOR`` times as many of wall time).
        memory_limit_mb: Address-space limit of each worker (None: unlimited).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self, num_workers: int = 2, timeout_s: float = 5.0, memory_limit_mb: int | None = 4096
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.stats = PoolStats()
        self._ctx = self._context()
        self._workers: list[_Worker] = []
        # at interpreter exit, before multiprocessing's SIGTERM-and-join of daemon children
        multiprocessing.util.Finalize(self, _kill_all, args=(self._workers,), exitpriority=10)
        self._crash_streak = 0  # crashes since the last answer graded: a broken worker setup

    @staticmethod
    def _context() -> Any:
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            return ctx
        return mp.get_context("spawn")

    def _spawn(self) -> _Worker:
        for attempt in range(_SPAWN_TRIES):
            parent, child = self._ctx.Pipe(duplex=True)
            process = self._ctx.Process(
                target=_worker_main, args=(child, self.memory_limit_mb), daemon=True
            )
            try:
                process.start()
            except (EOFError, ConnectionError):  # a forkserver a signal is killing
                parent.close()
                child.close()
                if attempt == _SPAWN_TRIES - 1:
                    raise
                time.sleep(0.1)  # multiprocessing starts another once this one is reaped
                continue
            child.close()
            return _Worker(process, parent)
        raise AssertionError("unreachable")

    def _ensure_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def _replace(self, worker: _Worker, pending: collections.deque[int]) -> None:
        """Kill ``worker`` and start another; its first task scored 0, the rest go back."""
        if worker.inflight:
            worker.inflight.popleft()
            pending.extendleft(reversed(worker.inflight))
        worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._spawn()

    def grade(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        reward_fns: str | Sequence[str] = "math",
    ) -> list[float]:
        """Score every response against its ground truth.

        Args:
            responses: Model responses.
            ground_truths: One reference answer per response.
            reward_fns: A reward spec (registered name or ``module:function``) for all responses,
                or one per response.

        Returns:
            One score per response, in order; 0.0 for an answer that timed out or crashed.
        """
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        specs = [reward_fns] * len(responses) if isinstance(reward_fns, str) else list(reward_fns)
        if len(specs) != len(responses):
            raise ValueError(f"{len(specs)} reward functions for {len(responses)} responses")
        for spec in set(specs):
            import_path_of(spec)  # an unknown name is a user error, not a 0 score
        self._ensure_workers()
        scores = [0.0] * len(responses)
        pending = collections.deque(range(len(responses)))
        for worker in list(self._workers):
            if not worker.process.is_alive():  # died idle (killed, say): costs no answer
                self._replace(worker, pending)
        while pending or any(w.inflight for w in self._workers):
            for worker in list(self._workers):
                while pending and len(worker.inflight) < _PREFETCH:
                    index = pending.popleft()
                    task = (index, specs[index], responses[index], ground_truths[index])
                    try:
                        worker.conn.send(task)
                    except (BrokenPipeError, OSError):  # died: replace, send this one again
                        pending.appendleft(index)
                        if worker.inflight:  # on the answer it was grading
                            self._record_crash(worker)
                        self._replace(worker, pending)
                        break
                    if not worker.inflight:
                        worker.begin(self.timeout_s)
                    worker.inflight.append(index)
            self._collect(scores, pending)
        return scores

    def _collect(self, scores: list[float], pending: collections.deque[int]) -> None:
        """Wait for results or deadlines; record scores and replace stuck or dead workers."""
        busy = [w for w in self._workers if w.inflight]
        if not busy:
            return
        next_deadline = min(w.deadline for w in busy)
        ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
        for worker in busy:
            if worker.conn in ready:
                try:
                    index, score, raised = worker.conn.recv()
                except (EOFError, OSError):
                    self._record_crash(worker)
                    self._replace(worker, pending)
                    continue
                assert index == worker.inflight[0], "worker answered out of order"
                worker.inflight.popleft()
                scores[index] = score
                self.stats.errors += raised
                worker.begin(self.timeout_s)  # the next task starts now
                self._crash_streak = 0
            elif time.monotonic() >= worker.deadline and not self._extend(worker):
                self.stats.timeouts += 1
                logger.warning(
                    "answer %d timed out (%.1f s of CPU, or %.0f s of wall time); scoring it 0",
                    worker.inflight[0],
                    self.timeout_s,
                    WALL_FACTOR * self.timeout_s,
                )
                self._replace(worker, pending)

    def _extend(self, worker: _Worker) -> bool:
        """At its deadline: move it to when the answer could have spent ``timeout_s`` of CPU,
        within its wall-clock bound; False when it has spent them (or is past the bound)."""
        if not _PROC:  # the wall clock alone
            return False
        now = time.monotonic()
        left = self.timeout_s - (_cpu_seconds(worker.process.pid) - worker.cpu0)
        bound = worker.started + WALL_FACTOR * self.timeout_s
        if left <= 0.01 or now >= bound:
            return False
        worker.deadline = min(now + left, bound)
        return True

    def _record_crash(self, worker: _Worker) -> None:
        self.stats.crashes += 1
        self._crash_streak += 1
        if self._crash_streak > 3 * self.num_workers + 3:
            raise RuntimeError(
                "grader workers keep dying without grading anything; see their stderr (a script "
                "that starts a pool needs the `if __name__ == '__main__':` guard)"
            )
        logger.warning("grader worker died on answer %d; scoring it 0", worker.inflight[0])

    def close(self) -> None:
        """Stop the workers."""
        for worker in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers.clear()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)


def grade_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    reward_fns: str | Sequence[str] = "math",
    *,
    num_workers: int = 2,
    timeout_s: float = 5.0,
) -> list[float]:
    """One-shot form of :meth:`RewardPool.grade` (starts and stops a pool)."""
    with RewardPool(num_workers=num_workers, timeout_s=timeout_s) as pool:
        return pool.grade(responses, ground_truths, reward_fns)
