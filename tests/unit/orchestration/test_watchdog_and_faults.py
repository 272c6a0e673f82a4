"""The hang watchdog (bounds, reports with stacks, the one-line summary), the preemption flag and
the non-finite guard, each in one process."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from hpt_megatron.config.base import ConfigError
from hpt_megatron.config.fault import FaultConfig
from hpt_megatron.config.schema import load_config
from hpt_megatron.orchestration.faults import NonFiniteError, NonFiniteGuard, Preemption
from hpt_megatron.orchestration.watchdog import EXIT_HANG, Watchdog

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny_cpu.yaml"


def _fault(**kw) -> FaultConfig:
    base = dict(hang_timeout_s=5.0, hang_min_s=0.3, hang_factor=2.0, watchdog_poll_s=0.05)
    return FaultConfig(**{**base, **kw})


def test_bounds_start_at_the_first_step_timeout_then_scale_with_observed_durations(tmp_path):
    dog = Watchdog(_fault(phase_timeout_s={"optimizer": 7.0}), tmp_path, 0, 1)
    assert dog.bound("forward_backward") == 5.0  # never seen: the warm-up bound
    t0 = time.monotonic()
    with dog.phase("forward_backward", 0):
        time.sleep(0.2)
    took = time.monotonic() - t0  # the phase's own duration is between 0.2 s and this
    assert 2 * 0.2 <= dog.bound("forward_backward") <= 2 * took  # twice the observed duration
    with dog.phase("broadcast"):
        pass
    assert dog.bound("broadcast") == 0.3  # the floor
    assert dog.bound("optimizer") == 7.0  # fixed by the config


def stuck_in_collective(release: threading.Event) -> None:
    release.wait(10)


def test_a_phase_past_its_bound_writes_stacks_and_a_summary_and_exits(tmp_path, capsys):
    exits: list[int] = []
    dog = Watchdog(_fault(), tmp_path, 0, 2, exit_fn=exits.append)
    with dog.phase("broadcast", 3):
        pass  # observed once: the bound is now the 0.3 s floor
    (tmp_path / "hang").mkdir(exist_ok=True)
    beat = {"rank": 1, "step": 3, "phase": "forward_backward", "in_phase_s": 1.0}
    (tmp_path / "hang" / "heartbeat_1.json").write_text(json.dumps({**beat, "time": time.time()}))
    release = threading.Event()
    dog.start()
    t0 = time.monotonic()
    with dog.phase("broadcast", 3):
        worker = threading.Thread(target=stuck_in_collective, args=(release,))
        worker.start()
        while not exits and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        release.set()
        worker.join()
    dog.stop()
    assert exits == [EXIT_HANG]
    report = (tmp_path / "hang" / "0.txt").read_text()
    assert "phase: broadcast" in report and "(bound 0.3 s)" in report
    assert "stuck_in_collective" in report  # all threads' stacks
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("hpt: HANG at step 4: rank 0 in broadcast for")
    assert "rank 1 wrote no report (frozen or dead; last heartbeat" in line
    assert "in forward_backward" in line


def test_a_peer_firing_makes_every_rank_report(tmp_path):
    exits: list[int] = []
    dog = Watchdog(_fault(), tmp_path, 1, 2, exit_fn=exits.append).start()
    with dog.phase("forward_backward", 0):
        (tmp_path / "hang" / "FIRED").write_text("{}")
        deadline = time.monotonic() + 20
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    dog.stop()
    assert exits == [EXIT_HANG]
    assert "a peer's watchdog fired" in (tmp_path / "hang" / "1.txt").read_text()


def test_fault_config_is_checked():
    with pytest.raises(ConfigError, match="fault.phase_timeout_s.forward: not a phase"):
        load_config(TINY, ["fault.phase_timeout_s={forward: 3}"])
    with pytest.raises(ConfigError, match="fault.collective_timeout_s: 60.0 must exceed"):
        load_config(TINY, ["fault.collective_timeout_s=60"])
    with pytest.raises(ConfigError, match="fault.preempt_signals: 'SIGKILL' is not one of"):
        load_config(TINY, ["fault.preempt_signals=[SIGKILL]"])
    cfg = load_config(TINY, ["fault.preempt_signals=[SIGUSR1]", "fault.hang_min_s=10"])
    assert cfg.fault.preempt_signals == ["SIGUSR1"] and cfg.checkpoint.async_save


class _World1:
    world_size = 1


def test_first_signal_sets_the_flag_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    preemption = Preemption(["SIGUSR1"])
    try:
        assert not preemption.agreed(_World1())  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert preemption.requested == "SIGUSR1"
        assert preemption.agreed(_World1())  # type: ignore[arg-type]
    finally:
        preemption.close()
    assert signal.getsignal(signal.SIGUSR1) == before


def _twice() -> None:
    os.environ.pop("SLURM_JOB_ID", None)  # outside Slurm (the suite may itself run in a job)
    Preemption(["SIGUSR1"])
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(5)
    os._exit(0)


def test_a_second_signal_exits_at_once():
    proc = multiprocessing.get_context("fork").Process(target=_twice)
    proc.start()
    proc.join(10)
    assert proc.exitcode == 128 + signal.SIGUSR1


def _slurm_repeat_then_another() -> None:
    os.environ["SLURM_JOB_ID"] = "12"  # in a Slurm job: a repeat within 10 s is the same request
    preemption = Preemption(["SIGUSR1", "SIGUSR2"])
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGUSR1)  # torchrun forwarding the SIGUSR1 Slurm sent the rank
    time.sleep(0.2)
    assert preemption.requested == "SIGUSR1"
    os.kill(os.getpid(), signal.SIGUSR2)  # another signal: exits at once
    time.sleep(5)
    os._exit(0)


def test_in_a_slurm_job_the_same_signal_again_soon_is_the_same_request():
    proc = multiprocessing.get_context("fork").Process(target=_slurm_repeat_then_another)
    proc.start()
    proc.join(10)
    assert proc.exitcode == 128 + signal.SIGUSR2


def test_non_finite_guard_counts_skips_and_stops_after_n_in_a_row(tmp_path: Path):
    guard = NonFiniteGuard(max_in_a_row=2)
    ok = {"loss": 0.5, "grad_norm": 1.0}
    guard.check(1, ok, None)
    assert ok["train/nonfinite_skipped"] == 0.0
    bad = {"loss": float("nan"), "grad_norm": float("nan")}
    guard.check(2, bad, tmp_path / "step_000001")
    assert bad["train/nonfinite_skipped"] == 1.0 and bad["train/nonfinite_total"] == 1.0
    guard.check(3, dict(ok), None)  # a good update resets the streak
    guard.check(4, {"loss": 1.0, "grad_norm": float("inf")}, tmp_path / "step_000003")
    with pytest.raises(NonFiniteError) as err:
        guard.check(5, {"loss": 1.0, "grad_norm": float("inf")}, tmp_path / "step_000004")
    message = str(err.value)
    assert message.startswith("step 5: grad_norm is inf for 2 updates in a row since step 4")
    assert f"Last good checkpoint: {tmp_path / 'step_000003'}." in message


def _ctrl_c_twice() -> None:
    os.environ.pop("SLURM_JOB_ID", None)  # outside Slurm (the suite may itself run in a job)
    Preemption(FaultConfig().preempt_signals)  # Ctrl-C is a preemption signal by default
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    os._exit(0)


def test_ctrl_c_stops_like_sigterm_and_a_second_exits_at_once_with_130():
    proc = multiprocessing.get_context("fork").Process(target=_ctrl_c_twice)
    proc.start()
    proc.join(10)
    assert proc.exitcode == 130
