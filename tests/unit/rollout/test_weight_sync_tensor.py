"""``weight_sync: tensor``: payloads that carry shared-memory handles (checked before they are
sent), loaded into fake SGLang servers that unpickle them as SGLang 0.5.23 does; the real
servers' run is ``tests/sglang/test_weight_sync_sglang.py``."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch

from hpt_megatron.rollout.sglang import SGLangEngine
from hpt_megatron.rollout.weight_sync.distributed import SyncError, read_back
from hpt_megatron.rollout.weight_sync.tensor import (
    check_payload,
    pickled_globals,
    send,
    serialize,
    shareable,
)
from tests.helpers.fake_servers import fake_engine, one_rank_pusher, targets


def _shm() -> set[str]:
    """This process's shared-memory files (torch names them ``torch_<pid>_...``; other tests
    may run beside this one)."""
    return {p.name for p in Path("/dev/shm").glob(f"torch_{os.getpid()}_*")}


def test_a_payload_holds_handles_that_another_process_maps_and_nothing_is_left() -> None:
    before = _shm()
    param = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
    bucket = shareable([("w", param.data), ("b", torch.ones(3, dtype=torch.bfloat16))])
    assert not param.untyped_storage().is_shared()  # the model's memory stays its own
    payload = serialize(bucket)
    assert len(base64.b64decode(payload)) < 2000  # handles, not the bytes
    assert pickled_globals(base64.b64decode(payload)) >= {
        ("torch.multiprocessing.reductions", "rebuild_storage_filename")
    }
    code = (
        "import base64, pickle, sys, torch; "
        "named = pickle.loads(base64.b64decode(sys.stdin.read())); "
        "print([(n, t.float().sum().item()) for n, t in named]); del named"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], input=payload, capture_output=True, text=True, timeout=120
    )
    assert other.stdout.strip() == "[('w', 15.0), ('b', 3.0)]", other.stderr
    del bucket
    assert not _shm() - before  # freed once both sides let go


def test_a_payload_sglang_would_die_on_is_refused_naming_the_tensors() -> None:
    bucket = [(f"layer{i}.weight", torch.ones(2)) for i in range(6)]
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(bucket)  # torch's default: descriptors over a socket
    with pytest.raises(ValueError, match=r"payload of layer0.weight, .* and 2 more would make "):
        check_payload(buffer.getvalue(), [name for name, _ in bucket])
    with pytest.raises(ValueError, match="ids is torch.int64"):
        shareable([("ids", torch.arange(3))])


def _engine(tmp_path: Path) -> SGLangEngine:
    return fake_engine(tmp_path, 2, weight_sync="tensor", weight_sync_timeout_s=60)


def test_the_pusher_loads_every_server_and_resyncs_a_restarted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DistributedPusher`` with ``kind="tensor"`` (one rank, one stage) through the engine's
    ``TensorTransport``: loads read back equal; a refusal names the server and the tensors and
    takes no server down; a server killed between pushes is restarted, held, and resynced."""
    pusher, buckets = one_rank_pusher(monkeypatch, timeout_s=60, kind="tensor", check=True)
    before = _shm()
    with _engine(tmp_path) as engine:
        engine.cfg.check_weights = True
        buckets[:] = [[("w", torch.arange(4.0))], [("b", torch.ones(2))]]
        assert pusher.push(1, engine) == 24
        assert engine.weight_version == 1 and engine.checked_tensors == 2
        assert not (tmp_path / "rollout_weights").exists()  # nothing through the disk
        # Outside a session every server refuses: named, with the tensor; none goes down.
        servers = targets(engine)
        with pytest.raises(SyncError, match=rf"tensor\) of w: {servers[0].url}\S+ refused"):
            send(servers, [("w", torch.zeros(4))], 9, 30.0)
        assert engine.health()
        os.killpg(engine.servers[1].proc.pid, signal.SIGKILL)
        engine.servers[1].proc.wait(timeout=30)
        buckets[:] = [[("w", torch.full((4,), 5.0))]]
        pusher.push(2, engine)  # redone over the survivor; the dead one restarts, held
        deadline = time.monotonic() + 60
        while engine.pool.held != {1}:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        buckets[:] = [[("w", torch.full((4,), 6.0))]]
        pusher.push(3, engine)
        assert engine.pool.held == set() and engine.weight_version == 3
        assert read_back(targets(engine), iter(buckets), 60.0) == 1
        # The engine's own push (buckets in the driver's hands) takes the same path.
        engine.update_weights([[("w", torch.full((4,), 8.0))]], version=4)
        assert read_back(targets(engine), iter([[("w", torch.full((4,), 8.0))]]), 60.0) == 1
        pusher.close()
    buckets.clear()
    assert not _shm() - before
