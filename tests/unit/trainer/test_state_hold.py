"""``StateHold``: the engine's optimizer step waits for a background checkpoint's snapshot, and
the checkpointer reports the time waited once."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

from hpt_megatron.trainer.checkpoint import Checkpointer
from hpt_megatron.trainer.engine import StateHold


def test_wait_blocks_until_released_and_counts_the_time():
    hold = StateHold()
    threading.Timer(0.05, hold.release).start()
    t0 = time.perf_counter()
    hold.wait()
    assert hold.released()
    assert time.perf_counter() - t0 >= 0.04
    assert hold.waited_s >= 0.04
    hold.wait()  # released: no second wait
    assert hold.waited_s < 1.0


def test_the_checkpointer_reports_each_wait_once(tmp_path: Path):
    ctx = SimpleNamespace(is_driver=True, rank=0, world_size=1, cpu_group=None)
    ckpt = Checkpointer(tmp_path, ctx, save_every=1, keep_last=1, last_step=10)  # type: ignore[arg-type]
    waited, pending = StateHold(), StateHold()
    waited.release()
    waited.wait()
    waited.waited_s = 0.5
    ckpt._holds = [waited, pending]
    assert ckpt.take_staging_wait() == 0.5
    assert ckpt._holds == [pending]  # not released yet: still to be counted
    assert ckpt.take_staging_wait() == 0.0
