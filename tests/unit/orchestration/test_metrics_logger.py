"""``MetricsLogger``'s JSONL file on a resumed run: cut to the resumed step, like TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from hpt_megatron.orchestration.metrics import MetricsLogger


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _log(run_dir: Path, start: int, steps: range) -> None:
    logger = MetricsLogger(
        run_dir, enabled=True, tensorboard=False, progress_bar=False, start_step=start
    )
    for step in steps:
        logger.log(step, {"loss": float(step)})
    logger.close()


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path: Path):
    _log(tmp_path, 0, range(1, 6))  # steps 1-5 logged, the checkpoint is at step 3
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by the crash
    _log(tmp_path, 3, range(4, 8))
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6, 7]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_a_fresh_run_in_an_old_folder_starts_the_file_again(tmp_path: Path):
    _log(tmp_path, 0, range(1, 4))
    _log(tmp_path, 0, range(1, 3))
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2]
