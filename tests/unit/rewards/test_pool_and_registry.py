import pathlib
import time

import pytest

from hpt_megatron.config.schema import load_config
from hpt_megatron.rewards import RewardPool, grade_batch, resolve_reward
from hpt_megatron.rewards.multiple_choice import extract_choice, multiple_choice_reward
from hpt_megatron.rewards.pool import IGNORED_SIGNALS, WALL_FACTOR

HOSTILE = "tests.unit.rewards.hostile_rewards"


def test_hang_and_crash_cost_one_answer_and_the_pool_recovers():
    n = 40
    responses = ["\\boxed{1}"] * n
    specs = ["math"] * n
    specs[3], specs[10], specs[11] = f"{HOSTILE}:hang", f"{HOSTILE}:crash", f"{HOSTILE}:raises"
    with RewardPool(num_workers=2, timeout_s=1.0) as pool:
        start = time.monotonic()
        scores = pool.grade(responses, ["1"] * n, specs)
        elapsed = time.monotonic() - start
        assert scores == [0.0 if i in (3, 10, 11) else 1.0 for i in range(n)]
        assert pool.stats.timeouts == 1 and pool.stats.crashes == 1 and pool.stats.errors == 1
        # one timeout (1 s of CPU, at most WALL_FACTOR s of wall on a loaded machine), not one per
        # remaining answer (36 more)
        assert elapsed < WALL_FACTOR * 1.0 + 6.0
        assert pool.grade(["\\boxed{2}"], ["2"]) == [1.0]  # still usable


def test_the_deadline_counts_cpu_so_a_slowed_answer_is_graded_and_a_blocked_one_is_cut():
    """An answer that takes longer than ``timeout_s`` of wall time without spending CPU (a
    loaded machine, here a sleep) is graded; one that waits for ever is cut at ``WALL_FACTOR``
    timeouts of wall time."""
    with RewardPool(num_workers=1, timeout_s=0.5) as pool:
        slow = f"{HOSTILE}:slow_length_reward"  # 1 s of sleep: 2 timeouts of wall time
        assert pool.grade(["abc", "ab"], ["3", "3"], slow) == [1.0, 0.0]
        assert pool.stats.timeouts == 0
        start = time.monotonic()
        assert pool.grade(["x", "\\boxed{1}"], ["1", "1"], [f"{HOSTILE}:blocked", "math"]) == [
            0.0,
            1.0,
        ]
        elapsed = time.monotonic() - start
        assert pool.stats.timeouts == 1
        assert WALL_FACTOR * 0.5 <= elapsed < WALL_FACTOR * 0.5 + 3.0


def test_grade_batch_with_a_user_reward_by_import_path():
    scores = grade_batch(["abc", "ab"], ["3", "3"], f"{HOSTILE}:length_reward", timeout_s=5)
    assert scores == [1.0, 0.0]


def test_grade_rejects_unknown_reward_and_length_mismatch():
    with RewardPool(num_workers=1) as pool:
        with pytest.raises(ValueError, match="unknown reward 'nope'"):
            pool.grade(["x"], ["1"], "nope")
        with pytest.raises(ValueError, match="2 responses but 1"):
            pool.grade(["x", "y"], ["1"])


def test_registry_resolves_names_and_paths():
    assert resolve_reward("math")("\\boxed{2}", "2") == 1.0
    assert resolve_reward(f"{HOSTILE}:length_reward")("ab", "2") == 1.0
    with pytest.raises(ValueError, match="has no callable"):
        resolve_reward(f"{HOSTILE}:missing")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.fn=nope", "reward.fn: unknown reward 'nope'"),
        ("reward.fn=no_such_pkg.mod:f", "reward.fn: reward 'no_such_pkg.mod:f': cannot import"),
        ("reward.by_data_source={gpqa: os:nothing}", "reward.by_data_source.gpqa"),
        ("reward.timeout_s=0", "reward.timeout_s"),
    ],
)
def test_reward_config_is_checked_on_load(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["model.inline={hidden_size: 8}", override])


def test_reward_config_accepts_an_import_path():
    cfg = load_config(None, ["model.inline={hidden_size: 8}", f"reward.fn={HOSTILE}:length_reward"])
    assert cfg.reward.fn_for("gpqa") == f"{HOSTILE}:length_reward"


@pytest.mark.parametrize(
    ("response", "choice"),
    [
        ("Reasoning...\nANSWER: C", "C"),
        ("ANSWER: A\nwait\nANSWER: (B)", "B"),
        ("so \\boxed{D}", "D"),
        ("so \\boxed{\\text{(B)}}", "B"),
        ("The answer is (A).", "A"),
        ("I am not sure", None),
        ("\\boxed{42}", None),
    ],
)
def test_extract_choice(response, choice):
    assert extract_choice(response) == choice


def test_multiple_choice_reward():
    assert multiple_choice_reward("ANSWER: C", "C") == 1.0
    assert multiple_choice_reward("ANSWER: c", "C") == 1.0
    assert multiple_choice_reward("ANSWER: B", "C") == 0.0
    assert multiple_choice_reward("C is tempting but ANSWER: B", "C") == 0.0
    assert multiple_choice_reward("\\boxed{C}", "\\boxed{C}") == 1.0


def test_preemption_signals_to_every_process_leave_the_workers_grading():
    """Slurm signals every process of a job step, the pool's forkserver and a worker mid-answer
    included; the rank decides what it means (a preemption) and closes the pool itself. The answer
    in flight is graded, not scored 0, and a worker replaced afterwards starts though the signal
    killed the forkserver (CI once lost the preemption checkpoint: the rank asked a dying
    forkserver for a worker and met EOFError)."""
    import os
    import signal
    import threading

    from hpt_megatron.config.fault import SIGNALS

    assert set(SIGNALS) <= set(IGNORED_SIGNALS)
    slow = "tests.unit.rewards.hostile_rewards:slow_length_reward"
    with RewardPool(num_workers=1, timeout_s=30) as pool:
        assert pool.grade(["\\boxed{1}"], ["1"]) == [1.0]  # the worker and forkserver are up
        worker = pool._workers[0].process.pid
        forkserver = int(pathlib.Path(f"/proc/{worker}/stat").read_text().rsplit(")")[1].split()[1])

        def signal_all() -> None:
            time.sleep(0.4)  # the worker is inside the slow answer
            for name in SIGNALS:
                for pid in (forkserver, worker):
                    os.kill(pid, getattr(signal, name))

        sender = threading.Thread(target=signal_all)
        sender.start()
        assert pool.grade(["abc", "ab"], ["3", "3"], slow) == [1.0, 0.0]
        sender.join()
        assert pool.stats.crashes == 0 and pool._workers[0].process.pid == worker
        # a real crash at once: its answer scores 0, and a replacement starts (another forkserver)
        specs = [f"{HOSTILE}:crash", "math"]
        assert pool.grade(["x", "\\boxed{2}"], ["1", "2"], specs) == [0.0, 1.0]
        assert pool.stats.crashes == 1 and pool._workers[0].process.pid != worker


def test_a_rank_that_exits_without_closing_its_pool_exits_promptly(tmp_path):
    """The workers ignore SIGTERM, so multiprocessing's exit (SIGTERM, then join) would wait
    forever; the pool's finalizer kills them first."""
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(
        "from hpt_megatron.rewards import RewardPool\n"
        "if __name__ == '__main__':\n"
        "    pool = RewardPool(num_workers=2)\n"
        "    print(pool.grade(['\\\\boxed{2}'], ['2']))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[1.0]", done.stderr
