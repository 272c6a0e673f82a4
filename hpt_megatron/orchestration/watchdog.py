"""The hang watchdog: every rank records the phase of the step it is in; a background thread
fires when a phase outlasts its bound.

Bounds (``fault`` section): a phase not yet seen finishing may last ``hang_timeout_s`` (the first
step warms up); afterwards ``max(hang_min_s, hang_factor * longest completed duration)``, unless
``phase_timeout_s`` fixes it. When one rank's phase passes its bound, that rank writes
``<run_dir>/hang/FIRED``; every rank's thread sees it (the run directory is shared, as the
checkpoints need), writes its phase table and all threads' Python stacks (``faulthandler``) to
``<run_dir>/hang/<rank>.txt``, and the process exits with :data:`EXIT_HANG` so a launcher
(``torchrun --max-restarts``) can restart the run from its last checkpoint. The driver (or, if the
driver wrote no report, the rank that fired) prints one line naming the stuck ranks and phases.

Each thread also rewrites ``hang/heartbeat_<rank>.json`` every few seconds, so that the report
says where a rank that could not write its own (frozen, dead) was last seen.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from hpt_megatron.config.fault import PHASES, FaultConfig

EXIT_HANG = 3
FIRED = "FIRED"
HEARTBEAT_EVERY_S = 5.0


@dataclass
class _PhaseStats:
    count: int = 0
    last_s: float = 0.0
    longest_s: float = 0.0


class Watchdog:
    """One per rank; :meth:`phase` marks the phases of a step (collective code calls it on every
    rank). ``exit`` is what ends the process when the watchdog fires (``os._exit`` outside tests).
    """

    def __init__(
        self,
        cfg: FaultConfig,
        run_dir: Path,
        rank: int,
        world_size: int,
        *,
        exit_fn=os._exit,
    ) -> None:
        self.cfg = cfg
        self.dir = Path(run_dir) / "hang"
        self.rank = rank
        self.world_size = world_size
        self.exit_fn = exit_fn
        self.stats = {name: _PhaseStats() for name in PHASES}
        self.step = 0
        self.current: tuple[str, float] | None = None  # (phase, monotonic start)
        self.fired = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started_wall = time.time()
        self._last_beat = 0.0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------- recording
    def start(self) -> Watchdog:
        if self.cfg.watchdog and self._thread is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._loop, name="hpt-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @contextmanager
    def phase(self, name: str, step: int | None = None) -> Iterator[None]:
        """Mark ``name`` as this rank's phase while the block runs (nested: the inner one counts,
        and the outer one resumes afterwards with its own start time)."""
        assert name in self.stats, name
        with self._lock:
            outer = self.current
            if step is not None:
                self.step = step
            self.current = (name, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                started = self.current[1] if self.current else time.monotonic()
                took = time.monotonic() - started
                stats = self.stats[name]
                stats.count += 1
                stats.last_s = took
                stats.longest_s = max(stats.longest_s, took)
                self.current = outer

    def bound(self, name: str) -> float:
        """Seconds ``name`` may last before the watchdog fires."""
        cfg = self.cfg
        if name in cfg.phase_timeout_s:
            return cfg.phase_timeout_s[name]
        stats = self.stats[name]
        if stats.count == 0:
            return cfg.hang_timeout_s
        return max(cfg.hang_min_s, cfg.hang_factor * stats.longest_s)

    # --------------------------------------------------------------------------- the thread
    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.watchdog_poll_s):
            now = time.monotonic()
            with self._lock:
                current = self.current
            if now - self._last_beat >= HEARTBEAT_EVERY_S:
                self._heartbeat(current, now)
            if current is not None and now - current[1] > self.bound(current[0]):
                self.fire(by_peer=False)
                return
            if self._peer_fired():
                self.fire(by_peer=True)
                return

    def _heartbeat(self, current: tuple[str, float] | None, now: float) -> None:
        self._last_beat = now
        beat = {
            "rank": self.rank,
            "step": self.step,
            "phase": current[0] if current else None,
            "in_phase_s": round(now - current[1], 3) if current else 0.0,
            "time": time.time(),
        }
        tmp = self.dir / f".heartbeat_{self.rank}.json"
        try:
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, self.dir / f"heartbeat_{self.rank}.json")
        except OSError:
            pass  # a full disk must not stop the watchdog itself

    def _peer_fired(self) -> bool:
        try:
            return (self.dir / FIRED).stat().st_mtime >= self._started_wall - 1.0
        except OSError:
            return False

    def fire(self, by_peer: bool) -> None:
        """Write this rank's report, name the stuck ranks (driver) and end the process."""
        self.fired = True
        with self._lock:
            current = self.current
        now = time.monotonic()
        phase = current[0] if current else None
        elapsed = now - current[1] if current else 0.0
        if not by_peer:
            with suppress(OSError):
                (self.dir / FIRED).write_text(
                    json.dumps({"rank": self.rank, "phase": phase, "step": self.step})
                )
        self._write_report(phase, elapsed, by_peer)
        grace = 2 * self.cfg.watchdog_poll_s + 1.5  # the peers see FIRED within one poll
        if self.rank == 0 or not self._wait_for(0, grace):
            self._wait_all(grace)
            print(self.summary(), file=sys.stderr, flush=True)
        else:
            time.sleep(1.0)  # the driver reads the reports; let it print before torchrun's kill
        self.exit_fn(EXIT_HANG)

    def _write_report(self, phase: str | None, elapsed: float, by_peer: bool) -> None:
        why = "a peer's watchdog fired" if by_peer else "its own phase passed its bound"
        lines = [
            f"rank {self.rank} of {self.world_size}, step {self.step + 1}, pid {os.getpid()}",
            f"phase: {phase or '(between phases)'} for {elapsed:.1f} s"
            + (f" (bound {self.bound(phase):.1f} s)" if phase else ""),
            f"reported because {why}",
            "",
            f"{'phase':<18}{'count':>7}{'last_s':>10}{'longest_s':>11}{'bound_s':>10}",
        ]
        for name, st in self.stats.items():
            lines.append(
                f"{name:<18}{st.count:>7}{st.last_s:>10.2f}{st.longest_s:>11.2f}"
                f"{self.bound(name):>10.1f}"
            )
        lines += ["", "Python stacks (all threads):", ""]
        report = self.dir / f"{self.rank}.txt"
        try:
            with open(report, "w") as fh:
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                faulthandler.dump_traceback(fh, all_threads=True)
        except OSError as err:
            print(f"hpt watchdog: cannot write {report}: {err}", file=sys.stderr, flush=True)

    def _wait_for(self, rank: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._fresh(self.dir / f"{rank}.txt"):
                return True
            time.sleep(0.1)
        return False

    def _wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._fresh(self.dir / f"{r}.txt") for r in range(self.world_size)):
                return
            time.sleep(0.1)

    def _fresh(self, path: Path) -> bool:
        try:
            return path.stat().st_mtime >= self._started_wall - 1.0
        except OSError:
            return False

    def summary(self) -> str:
        """One line: where each rank is stuck (from its report, else its last heartbeat)."""
        parts = []
        for r in range(self.world_size):
            report = self.dir / f"{r}.txt"
            if self._fresh(report):
                lines = report.read_text().splitlines()
                parts.append(f"rank {r} in {lines[1].removeprefix('phase: ')}")
                continue
            beat_file = self.dir / f"heartbeat_{r}.json"
            try:
                beat = json.loads(beat_file.read_text())
                ago = time.time() - float(beat["time"])
                parts.append(
                    f"rank {r} wrote no report (frozen or dead; last heartbeat {ago:.0f} s ago "
                    f"in {beat['phase'] or 'no phase'})"
                )
            except (OSError, ValueError, KeyError):
                parts.append(f"rank {r} wrote no report and no heartbeat")
        return (
            f"hpt: HANG at step {self.step + 1}: " + "; ".join(parts) + f". Stacks in {self.dir}/"
        )
