"""Fault injection on CPU (gloo, the tiny config), each run checking that nothing is lost: every
prompt of the sampler's data order is trained exactly once, at its step, and the run finishes.

- a rank SIGKILLed mid-step under ``torchrun --max-restarts 1`` restarts from the last checkpoint;
- a rank frozen (SIGSTOP) so that the other stalls inside a collective: the watchdog fires within
  its bound, names the stuck call, exits non-zero, and torchrun's restart finishes the run;
- SIGTERM mid-step: a checkpoint at that step, exit 0, and a resume continues from it;
- the checkpoint disk full (a small tmpfs mounted on ``<run>/checkpoints``; needs root, skipped
  otherwise): the error says where and why, the previous checkpoint stays the newest loadable;
- a reward function that raises or hangs and a malformed data row: the run goes on, the damage
  counted in the metrics.
"""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import time

import psutil
import pytest

from hpt_megatron.config import load_config
from hpt_megatron.data import build_prompt_dataset, build_sampler
from hpt_megatron.data.sample import RolloutBatch
from hpt_megatron.data.tokenizer import load_tokenizer
from hpt_megatron.trainer.checkpoint_files import list_checkpoints, verify_checkpoint
from tests.helpers import hpt_train
from tests.helpers.forked import run_cli
from tests.helpers.procs import kill_tree
from tests.helpers.tmpfs import mount_tmpfs, umount

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = hpt_train.TINY
pytestmark = [pytest.mark.faults, pytest.mark.distributed, pytest.mark.slow]  # 25-60 s each

SMALL = [
    "parallel.tp=1",
    "run.val_every=0",
    "data.prompts_per_step=4",
    "rollout.n=2",
    "rollout.max_new_tokens=32",
    "data.max_response_tokens=32",
    "data.arithmetic.train_size=64",
    "data.arithmetic.test_size=8",
    "checkpoint.export_hf=false",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.save_rollouts=true",
    "reward.num_workers=1",
]


def _command(
    out: pathlib.Path, steps: int, *extra: str, restarts: int = 0, static: bool = False
) -> list[str]:
    overrides = [f"run.steps={steps}", *SMALL, *extra]
    rendezvous = "static" if static else "c10d"
    return hpt_train.command(TINY, out, *overrides, restarts=restarts, rendezvous=rendezvous)


def _start(
    out: pathlib.Path, steps: int, *extra: str, restarts: int = 0, static: bool = False
) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115  # closed with the process
    return subprocess.Popen(
        _command(out, steps, *extra, restarts=restarts, static=static),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=hpt_train.env(),
        cwd=ROOT,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # the launcher and its ranks (each in a session of its own)
        proc.wait()
        raise


def _log(out: pathlib.Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


def _wait_for_step(out: pathlib.Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if step in hpt_train.metrics(out):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged:\n{_log(out)[-4000:]}")


def _rank(proc: subprocess.Popen, rank: int) -> psutil.Process:
    """The worker process of ``rank`` under the torchrun ``proc``."""
    for child in psutil.Process(proc.pid).children():  # the workers, not their helpers
        try:
            if child.environ().get("RANK") == str(rank) and "hpt_megatron.cli" in child.cmdline():
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} process")


def _check_nothing_lost(out: pathlib.Path, steps: int) -> None:
    """Every step logged once (a resume cuts ``metrics.jsonl`` to its step); each step trained
    exactly the prompts the sampler's order gives it."""
    assert sorted(hpt_train.metrics(out)) == list(range(1, steps + 1))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))
    cfg = load_config(out / "config.yaml")
    tokenizer = load_tokenizer(cfg.model.tokenizer_source, out)
    train_set = build_prompt_dataset(cfg.data, tokenizer, "train")
    sampler = build_sampler(cfg.data, train_set, cfg.run.seed)
    seen: list[str] = []
    for step in range(1, steps + 1):
        want = {p.prompt_id for p in sampler.next_batch()}
        batch = RolloutBatch.load_jsonl(out / "rollouts" / f"step_{step:06d}.jsonl")
        got = {s.prompt_id for s in batch.samples}
        assert got == want, f"step {step}: trained {sorted(got)}, the data order says {want}"
        seen += sorted(got)
    assert len(seen) == len(set(seen)) == steps * cfg.data.prompts_per_step  # once each


def test_sigkilled_rank_restarts_from_the_last_checkpoint_by_itself(tmp_path):
    out = tmp_path / "run"
    # A static rendezvous (--master_addr/--master_port): the restart reuses the agent's store.
    proc = _start(out, 6, "checkpoint.save_every=2", restarts=1, static=True)
    _wait_for_step(out, proc, 3)
    while not list_checkpoints(out / "checkpoints") and proc.poll() is None:
        time.sleep(0.05)  # the asynchronous save of step 2 completes during step 3 or 4
    _rank(proc, 1).kill()
    assert _finish(proc) == 0, _log(out)[-4000:]
    assert f"resumed from {out / 'checkpoints' / 'step_000002'}" in _log(out)
    _check_nothing_lost(out, 6)


def test_stalled_collective_fires_the_watchdog_and_the_restart_finishes(tmp_path):
    out, bound = tmp_path / "run", 5.0
    watchdog = [
        "fault.hang_timeout_s=60",
        f"fault.hang_min_s={bound}",
        "fault.hang_factor=2",
        "fault.watchdog_poll_s=0.25",
        "fault.collective_timeout_s=300",
    ]
    proc = _start(out, 4, "checkpoint.save_every=2", *watchdog, restarts=1)
    _wait_for_step(out, proc, 3)
    frozen = _rank(proc, 1)
    frozen.suspend()  # rank 0 then waits for it inside the next collective
    t0 = time.monotonic()
    report = out / "hang" / "0.txt"
    try:
        while not report.is_file() and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        fired_after = time.monotonic() - t0
        while "hpt: HANG" not in _log(out) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
    finally:
        frozen.resume()  # so that torchrun's SIGTERM ends it at once
    assert report.is_file(), _log(out)[-4000:]
    text = report.read_text()
    # It fired on the phase's own bound (hang_min_s, or hang_factor x that phase's longest
    # completed duration), within 2x of it: the report gives how long rank 0 had been in the
    # stuck phase. Timed from the suspend, a loaded machine adds the time rank 0 takes to reach
    # the collective (12 s at a load of 40 on 2 cores), which is not the watchdog's.
    stuck = re.search(r"^phase: \w+ for ([\d.]+) s \(bound ([\d.]+) s\)$", text, re.MULTILINE)
    assert stuck is not None, text[:2000]
    in_phase, phase_bound = float(stuck.group(1)), float(stuck.group(2))
    assert bound <= phase_bound < 60 and in_phase < 2 * phase_bound, stuck.group(0)
    assert fired_after < 60, fired_after  # never the hang_timeout_s fallback
    assert "torch/distributed/distributed_c10d.py" in text  # the stuck collective's frame
    assert "Python stacks (all threads)" in text and "hpt-watchdog" not in text.split("\n")[0]
    assert _finish(proc) == 0, _log(out)[-4000:]  # restarted by torchrun, resumed, finished
    log = _log(out)
    line = next(ln for ln in log.splitlines() if ln.startswith("hpt: HANG at step"))
    assert "rank 0 in " in line and "rank 1 wrote no report (frozen or dead" in line
    _check_nothing_lost(out, 4)


def test_sigterm_checkpoints_the_current_step_exits_0_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, 4, "checkpoint.save_every=0")
    _wait_for_step(out, proc, 2)
    for rank in (0, 1):  # what Slurm does: every task of the step gets the signal
        _rank(proc, rank).send_signal(signal.SIGTERM)
    assert _finish(proc) == 0, _log(out)[-4000:]
    stopped = max(hpt_train.metrics(out))
    assert stopped < 4
    assert f"stopped by SIGTERM after step {stopped}" in _log(out)
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == f"step_{stopped:06d}" and verify_checkpoint(newest) is None
    assert json.loads((newest / "hpt_state.json").read_text())["step"] == stopped
    assert _finish(_start(out, 4)) == 0, _log(out)[-4000:]
    assert f"resumed from {newest}" in _log(out)
    _check_nothing_lost(out, 4)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    mount_tmpfs(ckpts, "15m")  # two checkpoints of the tiny model (about 7 MB each) fit
    try:
        proc = _start(out, 4, "checkpoint.save_every=1", "checkpoint.keep_last=10")
        assert _finish(proc) != 0
        log = _log(out)
        assert "checkpoint step_000003 could not be written to" in log, log[-4000:]
        assert "no space left on device" in log.lower()
        assert [p.name for p in list_checkpoints(ckpts)] == ["step_000001", "step_000002"]
        assert verify_checkpoint(ckpts / "step_000002") is None
        assert not list(ckpts.glob("*.tmp"))  # the partial files were removed
        subprocess.run(["mount", "-o", "remount,size=64m", str(ckpts)], check=True)
        proc = _start(out, 4, "checkpoint.save_every=1", "checkpoint.keep_last=1")
        assert _finish(proc) == 0, _log(out)[-4000:]
        assert f"resumed from {ckpts / 'step_000002'}" in _log(out)
        _check_nothing_lost(out, 4)
    finally:
        umount(ckpts)


def test_failing_rewards_and_a_malformed_row_are_counted_and_the_run_goes_on(tmp_path):
    """One process (forked, no torchrun): a reward function that raises on some answers and hangs
    on others, and a data file with one malformed row."""
    from hpt_megatron.data.arithmetic import arithmetic_examples

    rows = [
        {"prompt": ex.messages[-1]["content"], "answer": ex.ground_truth}
        for ex in arithmetic_examples("train", train_size=40, test_size=4)
    ]
    rows.insert(5, {"prompt": "", "answer": "3"})  # malformed: an empty prompt
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    args = [
        "train",
        TINY,
        f"run.output_dir={out}",
        "run.steps=3",
        *SMALL,
        f"data.train={data}",
        "data.template=raw",
        "data.system_prompt=null",
        "algorithm.preset=grpo",
        "rollout.n=4",
        "reward.fn=tests.unit.rewards.hostile_rewards:flaky",
        "reward.timeout_s=0.5",
        "checkpoint.save_every=2",
    ]
    code, log = run_cli(args, tmp_path / "run.log")
    assert code == 0, log[-4000:]
    last = hpt_train.metrics(out)[3]
    assert last["data/bad_rows"] == 1.0
    assert last["reward/errors_total"] > 0 and last["reward/timeouts_total"] > 0, last
    _check_nothing_lost(out, 3)
