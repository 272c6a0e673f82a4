"""``MetricsLogger`` with wandb, offline: a resumed run continues the wandb run of its first
start (the id kept in ``<run_dir>/wandb_run_id``), and the values logged reach wandb's files.

The offline run files (``wandb/offline-run-*-<id>/run-<id>.wandb``) are read with a short reader
of their format: leveldb's log format (32 KiB blocks of chunks, each with a 7-byte header: CRC,
length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ``:W&B`` file header, each whole record a
``wandb_internal_pb2.Record`` protobuf. wandb 0.31 has no Python reader of its own (its
``datastore`` moved into the Go ``wandb-core``).
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from hpt_megatron.orchestration.metrics import WANDB_ID_FILE, MetricsLogger

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    for name in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)


def _records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history(path: Path) -> tuple[str, dict[int, float]]:
    """The run id and each logged step's ``loss`` in one offline run file."""
    run_id, losses = "", {}
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {_key(item): json.loads(item.value_json) for item in record.history.item}
            losses[record.history.step.num] = float(items["loss"])
    return run_id, losses


def _written(path: Path) -> tuple[str, dict[int, float]]:
    """:func:`_history` once wandb-core (its own process) has written the file: ``finish()``
    sometimes returns a fraction of a second before the records are in it (seen: up to 0.1 s)."""
    deadline = time.monotonic() + 10
    while (found := _history(path))[0] == "" and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _key(item) -> str:
    """A history item's name: ``key``, or ``nested_key``'s parts (where wandb-core puts it)."""
    return item.key or "/".join(item.nested_key)


def _log(run_dir: Path, start: int, steps: range, offset: float) -> None:
    logger = MetricsLogger(
        run_dir,
        enabled=True,
        tensorboard=False,
        progress_bar=False,
        wandb_project="hpt-test",
        start_step=start,
    )
    for step in steps:
        logger.log(step, {"loss": offset + step})
    logger.close()


def test_a_resumed_run_continues_the_same_offline_wandb_run(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _log(run_dir, 0, range(1, 4), 0.0)  # steps 1-3; the checkpoint is at step 2
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum()
    _log(run_dir, 2, range(3, 5), 10.0)  # the resume logs steps 3-4
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    # offline-run-<start time>-<id>, with -1 after a second start within the same second
    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(folders) == 2, sorted(p.name for p in (run_dir / "wandb").iterdir())
    first, resumed = (_written(folder / f"run-{run_id}.wandb") for folder in folders)
    assert first == (run_id, {1: 1.0, 2: 2.0, 3: 3.0})
    assert resumed == (run_id, {3: 13.0, 4: 14.0})


def test_a_run_from_step_zero_starts_a_new_wandb_run(tmp_path: Path):
    _log(tmp_path, 0, range(1, 2), 0.0)
    first = (tmp_path / WANDB_ID_FILE).read_text()
    _log(tmp_path, 0, range(1, 2), 0.0)
    assert (tmp_path / WANDB_ID_FILE).read_text() != first


class _OnlineRun:
    """What ``wandb.init`` returns online on a resume: the run holds steps up to 4."""

    id, starting_step = "abcd1234", 5

    def __init__(self) -> None:
        self.logged: list[int] = []

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.logged.append(step)

    def finish(self) -> None:
        pass


def test_a_resumed_online_run_sends_only_the_steps_wandb_does_not_hold(
    tmp_path: Path, monkeypatch, capsys
):
    # Online needs a wandb server: its resumed run is stood in for (its starting_step).
    import types

    run = _OnlineRun()
    inits: list[dict] = []
    fake = types.SimpleNamespace(init=lambda **kwargs: inits.append(kwargs) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / WANDB_ID_FILE).write_text("abcd1234\n")
    logger = MetricsLogger(
        tmp_path,
        enabled=True,
        tensorboard=False,
        progress_bar=False,
        wandb_project="hpt-test",
        start_step=2,
    )
    for step in range(3, 7):
        logger.log(step, {"loss": 1.0})
    logger.close()
    assert [(i["id"], i["resume"]) for i in inits] == [("abcd1234", "allow")]
    assert run.logged == [5, 6]
    assert "wandb run abcd1234 already holds steps up to 4; steps 3-4" in capsys.readouterr().out
