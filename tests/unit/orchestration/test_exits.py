"""``hpt train``'s recognised errors: one message, its exit code, torchrun's error file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpt_megatron.config import ConfigError
from hpt_megatron.disk import WriteError
from hpt_megatron.orchestration.exits import describe, exit_code, is_secondary, report
from hpt_megatron.orchestration.faults import NonFiniteError
from hpt_megatron.rollout.sglang.server import ServerStartError
from hpt_megatron.trainer.checkpoint_files import CheckpointError

GLOO_LOST = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5027"


def test_user_errors_exit_2_and_stops_of_the_run_exit_1():
    assert exit_code(ConfigError("x")) == exit_code(ValueError("x")) == 2
    assert exit_code(ServerStartError("rollout.sglang.urls: ...")) == 2
    for err in (
        WriteError("w"),
        CheckpointError("c"),
        NonFiniteError("n"),
        RuntimeError(GLOO_LOST),
    ):
        assert exit_code(err) == 1
    assert exit_code(RuntimeError("a bug")) is None and exit_code(KeyError("k")) is None
    assert describe(ServerStartError("no server")) == "no server"
    assert describe(CheckpointError("disk")) == "CheckpointError: disk"
    assert is_secondary(RuntimeError(GLOO_LOST)) and not is_secondary(ValueError("x"))
    unreachable = ServerStartError("rollout.sglang.urls: ... (Connection reset by peer)")
    assert not is_secondary(unreachable) and exit_code(unreachable) == 2


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_the_error_file_holds_the_message_and_rank_0_prints_it(
    tmp_path: Path, monkeypatch, capsys, rank: str
):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", rank)
    assert report("hpt train: bad data", 2) == 2
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["message"] == recorded["extraInfo"]["py_callstack"] == "hpt train: bad data"
    assert capsys.readouterr().err == ("hpt train: bad data\n" if rank == "0" else "")


def test_a_lost_peer_is_dated_after_the_cause(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    report("cause", 2)
    first = json.loads((tmp_path / "error.json").read_text())["message"]["extraInfo"]
    report("lost", 1, secondary=True)
    then = json.loads((tmp_path / "error.json").read_text())["message"]["extraInfo"]
    assert int(then["timestamp"]) > int(first["timestamp"])


def test_without_torchrun_the_message_is_printed(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv("RANK", "1")  # forked ranks without torchrun's agent
    report("hpt train: x", 1)
    assert capsys.readouterr().err == "hpt train: x\n"
