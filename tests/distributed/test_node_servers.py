"""``start_node_servers`` over two "nodes" (two ``torchrun --nnodes 2`` launches on loopback) with
the fake SGLang server of tests/unit/rollout: each node's rank starts and supervises its own
server, the driver gets both URLs, a server restarted by its node is brought to the current
weights, and a node that cannot start its servers is an error on every rank that names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import free_port
from tests.helpers.procs import pids_with

WORKER = Path(__file__).parent / "workers" / "node_servers.py"
pytestmark = pytest.mark.distributed


def _two_nodes(mode: str, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HPT_NODE_KEY": "node-key-123"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2"]
        cmd += [f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={port}", str(WORKER), mode, str(out)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_each_node_serves_and_restarts_its_own_server(tmp_path: Path) -> None:
    r0, r1 = _two_nodes("serve", tmp_path)
    assert (r0["node"], r1["node"], r0["num_nodes"]) == (0, 1, 2)
    assert len(r0["urls"]) == 2 and len(set(r0["urls"])) == 2
    servers = json.loads((tmp_path / "sglang_logs" / "servers.json").read_text())
    assert [s["node"] for s in servers] == [0, 1]
    assert [s["pid"] for s in servers] == [r0["own_pids"][0], r1["own_pids"][0]]
    requests = r0["requests_before"]
    assert requests["rollout/requests/server_0"] > 0 and requests["rollout/requests/server_1"] > 0
    # Node 1 restarted its server (a new process); the driver found it serving its start
    # weights and loaded version 1 into it before generating.
    assert r1["restarted_pid"] != r1["own_pids"][0]
    assert r0["stale_resyncs"] == 1 and r0["versions"] == ["1", "1"]
    # The driver's shutdown left node 1's server to node 1; each node's close stopped its own.
    assert r1["own_alive_after_driver_shutdown"] == [True]
    assert all(_gone(pid) for pid in [*r0["own_pids"], r1["restarted_pid"]])
    assert not list(tmp_path.glob("rollout_weights/.node_check_*"))  # the marker is removed
    for log in (tmp_path / "sglang_logs").glob("*.log"):  # the key is blanked in the logs
        assert "node-key-123" not in log.read_text()


def test_a_node_that_cannot_start_is_an_error_on_every_rank(tmp_path: Path) -> None:
    r0, r1 = _two_nodes("fail", tmp_path)
    for result in (r0, r1):
        assert "could not start on every node" in result["error"]
        assert "node 1: SGLang python" in result["error"] and "node 0" not in result["error"]
    # Node 0 had started its server, and stopped it on the error.
    assert (tmp_path / "sglang_logs" / "node0_server_0.log").is_file()
    left = pids_with(str(tmp_path / "model").encode())
    assert not left, f"processes left: {left}"
    assert not (tmp_path / "sglang_logs" / "servers.json").exists()
