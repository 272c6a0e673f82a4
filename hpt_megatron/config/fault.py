"""The ``fault`` section: how a run reacts to hangs, preemption and non-finite updates.

See docs/operations.md for what a user sees in each case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The phases of a step the hang watchdog tracks (orchestration/watchdog.py).
PHASES = (
    "rollout",  # the driver generates and grades; the other ranks wait for its batch
    "broadcast",  # the step's batch sent from the driver to every rank
    "forward_backward",
    "optimizer",
    "weight_sync",  # trainer weights into the rollout engine
    "validation",
    "checkpoint",
)
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


@dataclass(kw_only=True)
class FaultConfig:
    """Hang watchdog, collective timeout, preemption signals and the non-finite guard."""

    # torch.distributed collectives (init_process_group timeout) give up after this long. The
    # other ranks wait for the driver's rollout inside a collective: keep it above the longest.
    collective_timeout_s: float = 5400.0
    watchdog: bool = True
    # A phase never seen finishing yet (the first step: warm-up, compilation) may last this long.
    hang_timeout_s: float = 3600.0
    # Once observed: bound = max(hang_min_s, hang_factor * the longest completed duration).
    hang_factor: float = 5.0
    hang_min_s: float = 600.0
    # Fixed bounds for some phases (seconds), overriding the two rules above.
    phase_timeout_s: dict[str, float] = field(default_factory=dict)
    watchdog_poll_s: float = 1.0
    # Signals that stop the run after the current step with a checkpoint (a second one: at once);
    # SIGINT is Ctrl-C.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    # Updates skipped in a row for a non-finite loss or gradient norm before the run stops
    # (0: never stop, keep skipping).
    max_nonfinite_steps: int = 3

    def validate(self) -> None:
        for name in ("collective_timeout_s", "hang_timeout_s", "hang_min_s", "watchdog_poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.hang_factor < 1:
            raise ValueError(f"hang_factor: must be >= 1, got {self.hang_factor}")
        for phase, bound in self.phase_timeout_s.items():
            if phase not in PHASES:
                raise ValueError(f"phase_timeout_s.{phase}: not a phase; phases are {list(PHASES)}")
            if bound <= 0:
                raise ValueError(f"phase_timeout_s.{phase}: must be > 0, got {bound}")
        bounds = [self.hang_timeout_s, self.hang_min_s, *self.phase_timeout_s.values()]
        if self.watchdog and max(bounds) >= self.collective_timeout_s:
            raise ValueError(
                f"collective_timeout_s: {self.collective_timeout_s} must exceed every watchdog "
                f"bound (largest {max(bounds)}), so the watchdog reports a hang before the "
                "collective gives up without saying where"
            )
        for sig in self.preempt_signals:
            if sig not in SIGNALS:
                raise ValueError(f"preempt_signals: {sig!r} is not one of {list(SIGNALS)}")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps: must be >= 0, got {self.max_nonfinite_steps}")
