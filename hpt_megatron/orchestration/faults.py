"""How a run stops on purpose: preemption signals and the non-finite update guard.

Preemption. The first of ``fault.preempt_signals`` (SIGTERM, what Slurm and Kubernetes send
before a kill; SIGUSR1 with ``sbatch --signal``; SIGINT, Ctrl-C) only sets a flag; at the end of
every step the ranks agree on it (a MAX all-reduce of the flag, so a signal that reached one rank
stops all of them after the same step), write a checkpoint, stop the rollout engine and exit 0.
A second signal exits at once with 128 + the signal number. In a Slurm job (``SLURM_JOB_ID``
set) Slurm sends its SIGTERM to every process of the job step, torchrun and each rank, and
torchrun forwards it to the ranks again: there a repeat of the first signal within
``SLURM_REPEAT_S`` seconds is the same request, not a second one.

Under torchrun the ranks run in sessions of their own: Ctrl-C and a scheduler's SIGTERM reach
the launcher, which forwards the signal to each rank's process group and waits for them (30 s,
``--shutdown-timeout``) before it kills them; a second signal to the launcher makes it send
SIGTERM at once, the ranks' second signal. The reward workers ignore the preemption signals
(the rank closes its pool; ``rewards/pool.py``, which also outlives a forkserver they kill).

Non-finite guard. The engine skips an update whose loss or gradient norm is not finite; this guard
counts the skips and stops the run after ``fault.max_nonfinite_steps`` in a row.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpt_megatron.parallel.runtime import ParallelContext

log = logging.getLogger(__name__)

SLURM_REPEAT_S = 10.0  # in a Slurm job, the same signal again within this is the same request


class Preemption:
    """Installs the handlers of ``signals`` (main thread only); :meth:`agreed` is collective.

    ``repeat_window``: seconds after the first signal in which the same signal again is taken
    as the same request (default: ``SLURM_REPEAT_S`` in a Slurm job, else 0)."""

    def __init__(self, signals: list[str], repeat_window: float | None = None) -> None:
        self.requested: str | None = None
        if repeat_window is None:
            repeat_window = SLURM_REPEAT_S if "SLURM_JOB_ID" in os.environ else 0.0
        self.repeat_window = repeat_window
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for name in signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == self.requested and time.monotonic() - self._first_at < self.repeat_window:
            print(
                f"hpt: {name} again within {self.repeat_window:g} s: the same request (Slurm "
                "signals every process of the job step and torchrun forwards it)",
                file=sys.stderr,
                flush=True,
            )
            return
        if self.requested is not None:
            print(f"hpt: second {name}: exiting now without a checkpoint", file=sys.stderr)
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested, self._first_at = name, time.monotonic()
        print(
            f"hpt: {name} received: finishing the current step, then checkpointing and exiting "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, ctx: ParallelContext) -> bool:
        """Collective: whether any rank was asked to stop."""
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        if ctx.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
        return bool(flag.item())

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Counts updates skipped for a non-finite loss or gradient norm (the engine skips them)."""

    METRICS = ("loss", "grad_norm")

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0
        self.first_bad = 0
        self.before_streak: Path | None = None

    def check(self, step: int, metrics: dict[str, float], last_good: Path | None) -> None:
        """Add the guard's counts to ``metrics``; raise after too many bad updates in a row.

        ``last_good`` is the newest complete checkpoint; the error names the one that was newest
        when the streak began (skipped updates leave the weights as they were).
        """
        bad = [k for k in self.METRICS if k in metrics and not math.isfinite(metrics[k])]
        if bad:
            if self.in_a_row == 0:
                self.first_bad, self.before_streak = step, last_good
            self.in_a_row += 1
            self.total += 1
            log.warning(
                "step %d: non-finite %s; the update was skipped (%d in a row)",
                step,
                ", ".join(f"{k}={metrics[k]}" for k in bad),
                self.in_a_row,
            )
        else:
            self.in_a_row = 0
        metrics["train/nonfinite_skipped"] = float(bool(bad))
        metrics["train/nonfinite_total"] = float(self.total)
        if bad and self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            where = str(self.before_streak or "none (the run has not saved one yet)")
            raise NonFiniteError(
                f"step {step}: {bad[0]} is {metrics[bad[0]]} for {self.in_a_row} updates in a "
                f"row since step {self.first_bad} (fault.max_nonfinite_steps="
                f"{self.max_in_a_row}); stopping. Last good checkpoint: {where}. Resume from it "
                "with a lower trainer.lr, check the data of these steps (logging.save_rollouts) "
                "or raise fault.max_nonfinite_steps."
            )
