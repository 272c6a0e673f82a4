"""``weight_sync: distributed`` against fake SGLang servers that join gloo groups the way SGLang
0.5.23 does on CPU (``fake_sglang``): loads read back equal, a restarted server is held out of
generation until the next push brings it into fresh groups, and bad input is named."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.sglang import SGLangEngine
from hpt_megatron.rollout.sglang.client import ServerPool
from hpt_megatron.rollout.weight_sync.distributed import (
    SyncError,
    Target,
    UpdateGroup,
    read_back,
    trainer_host,
    validate_bucket,
)
from tests.helpers.fake_servers import fake_engine, one_rank_pusher, targets


def _engine(tmp_path: Path, servers: int = 2) -> SGLangEngine:
    # (a fake imports torch at its first join: slow on a busy host)
    return fake_engine(tmp_path, servers, weight_sync="distributed", weight_sync_timeout_s=120)


def _targets(engine: SGLangEngine) -> list[Target]:
    return targets(engine)


def _groups(engine: SGLangEngine, index: int) -> list[str]:
    return engine.admin(lambda client: client.get(index, "/model_info"))["groups"]


def test_pushes_read_back_equal_and_a_restarted_server_rejoins_fresh_groups(tmp_path: Path) -> None:
    first = [("w", torch.arange(6.0).view(2, 3)), ("b", torch.ones(3, dtype=torch.bfloat16))]
    second = [(name, tensor + 1) for name, tensor in first]
    with _engine(tmp_path) as engine:
        engine.update_weights([first], version=1)
        assert read_back(_targets(engine), iter([first]), 60.0) == 2
        assert [len(_groups(engine, i)) for i in range(2)] == [1, 1]
        assert not (tmp_path / "rollout_weights").exists()  # nothing through the disk

        os.killpg(engine.servers[1].proc.pid, signal.SIGKILL)
        # Reaped before it is reached: a killed process refuses connections a moment before it
        # exits, and a server still seen alive then is not restarted (on a busy host: flaky).
        engine.servers[1].proc.wait(timeout=30)
        gens = engine.generate([[1], [2], [3]], SamplingParams(max_new_tokens=2))
        assert [g.weight_version for g in gens] == [1, 1, 1]
        deadline = time.monotonic() + 30
        while engine.pool.state[1] != "up":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert engine.pool.held == {1} and engine.servers[1].restarts == 1
        served = list(engine.pool.requests)
        engine.generate([[4], [5]], SamplingParams(max_new_tokens=2))
        assert engine.pool.requests[1] == served[1]  # held: its weights are its start ones

        engine.update_weights([second], version=2)
        assert engine.pool.held == set()
        assert read_back(_targets(engine), iter([second]), 60.0) == 2
        # Fresh groups: the survivor left the old one; the restarted server holds only the new.
        assert _groups(engine, 0) == _groups(engine, 1) and len(_groups(engine, 0)) == 1
        pids = [server.proc.pid for server in engine.servers]
    time.sleep(0.5)
    assert not [pid for pid in pids if Path(f"/proc/{pid}/cmdline").exists() and _running(pid)]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_every_server_held_is_a_clear_error_not_a_hang() -> None:
    class _Server:
        url = "http://127.0.0.1:1"

        def log_tail(self, lines: int = 40) -> str:
            return ""

    import asyncio

    pool = ServerPool([_Server()], max_concurrency=1, max_restarts=1)  # type: ignore[list-item]
    pool.held.add(0)
    with pytest.raises(RuntimeError, match="waits for the next weight push"):
        asyncio.run(pool.acquire())


def test_bad_input_names_the_server_or_tensor_and_takes_no_server_down(tmp_path: Path) -> None:
    with _engine(tmp_path, servers=1) as engine:
        with pytest.raises(ValueError, match="weight sync: ids is torch.int64"):
            engine.update_weights([[("ids", torch.arange(3))]], version=1)
        engine.update_weights([[("w", torch.ones(2))]], version=1)  # the session was closed
        target = _targets(engine)[0]
        # A group name the server already holds: it refuses, named, within the timeout.
        taken = UpdateGroup("taken", [target], "gloo", timeout_s=120.0)
        taken.join()
        taken.destroy()  # (this side only: the server keeps it)
        started = time.monotonic()
        with pytest.raises(SyncError, match=f"{target.url}/init_weights_update_group refused"):
            UpdateGroup("taken", [target], "gloo", timeout_s=3.0).join()
        assert time.monotonic() - started < 20
        # A server that is not there (wrong port): named before anything is posted.
        wrong = Target(0, "http://127.0.0.1:9", {})
        with pytest.raises(SyncError, match=r"http://127.0.0.1:9 does not answer /health"):
            UpdateGroup("g", [wrong], "gloo", timeout_s=3.0).join()
        assert engine.health()
        engine.update_weights([[("w", torch.full((2,), 3.0))]], version=2)
        assert read_back(_targets(engine), iter([[("w", torch.full((2,), 3.0))]]), 60.0) == 1


def test_payload_checks_and_trainer_address() -> None:
    validate_bucket([("w", torch.ones(2, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="a tensor without a name"):
        validate_bucket([("", torch.ones(2))])
    with pytest.raises(ValueError, match="weight sync: e is sparse or empty"):
        validate_bucket([("e", torch.ones(0))])
    local = [Target(0, "http://127.0.0.1:5/", {}), Target(1, "http://localhost:6", {})]
    assert trainer_host(local) == "127.0.0.1"


def test_the_pusher_sends_reads_back_and_names_a_bad_tensor_on_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DistributedPusher`` (one rank, one stage) through the engine's transport: the push
    loads and checks every tensor; a payload no server could take fails before it is sent,
    naming the tensor, and the session is closed so the next push goes through."""

    pusher, buckets = one_rank_pusher(monkeypatch, timeout_s=120, check=True)
    with _engine(tmp_path, servers=2) as engine:
        engine.cfg.check_weights = True
        buckets[:] = [[("w", torch.arange(4.0))], [("b", torch.ones(2))]]
        assert pusher.push(1, engine) == 24
        assert engine.weight_version == 1 and engine.checked_tensors == 2
        buckets[:] = [[("ids", torch.arange(3))]]
        with pytest.raises(SyncError, match="rank 0: weight sync: ids is torch.int64"):
            pusher.push(2, engine)
        buckets[:] = [[("w", torch.full((4,), 7.0))]]
        pusher.push(3, engine)
        assert engine.weight_version == 3
        assert read_back(_targets(engine), iter(buckets), 60.0) == 1
        # A stage whose first tensor is a norm of ones (exact in every precision) and whose
        # fp32 weights the servers (dtype auto: float16) round: checked in float16, equal.
        norm = ("model.layers.1.input_layernorm.weight", torch.ones(8))
        proj = ("model.layers.1.self_attn.o_proj.weight", torch.randn(8, 8) * 0.02)
        buckets[:] = [[norm, proj], [("model.norm.weight", torch.ones(8))]]
        pusher.push(4, engine)
        assert engine.checked_tensors == 3
        with pytest.raises(RuntimeError, match=r"holds model.layers.1.self_attn.o_proj.weight "):
            read_back(_targets(engine), iter([[norm, (proj[0], proj[1] + 1e-3)]]), 60.0)
        # A server dead before a push that nothing noticed yet: its begin fails, the sessions
        # opened on the others are closed, and the push is redone over them; it is restarted,
        # held, and the next push resyncs it.
        os.killpg(engine.servers[1].proc.pid, signal.SIGKILL)
        engine.servers[1].proc.wait(timeout=30)
        buckets[:] = [[("w", torch.full((4,), 5.0))]]
        pusher.push(5, engine)
        assert engine.weight_version == 5 and engine.servers[1].restarts == 1
        deadline = time.monotonic() + 60
        while engine.pool.held != {1}:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        buckets[:] = [[("w", torch.full((4,), 6.0))]]
        pusher.push(6, engine)
        assert engine.pool.held == set()
        assert read_back(_targets(engine), iter(buckets), 60.0) == 1
        pusher.close()
