"""Two nodes on loopback: ``torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1`` at PP=2
(one pipeline stage per node), each node's rank starting that node's CPU SGLang server.

Checked: both servers serve rollouts (the per-server request counts); after every weight load,
each server's tensors, read back over HTTP, equal the synced folder's (``check_weights``);
node 1's server, SIGKILLed after step 1, is restarted by node 1, gets the current weights and
serves again, and the run then stops cleanly on SIGTERM; the API key is on no command line and
in no log; and SIGTERM of both launches leaves no server running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.launch import free_port
from tests.helpers import hpt_train
from tests.helpers.procs import kill_tree, pids_with
from tests.helpers.sglang_cpu import require_sglang

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(1800)]

KEY = "two-node-test-key-0123456789abcdef"
OVERRIDES = [
    "parallel.tp=1",
    "parallel.pp=2",
    "run.val_every=0",
    "data.prompts_per_step=4",
    "rollout.n=4",
    "logging.progress_bar=false",
    *hpt_train.SGLANG_CPU,
    "rollout.sglang.host=127.0.0.1",  # servers in tests listen on loopback only
    "rollout.sglang.router=false",
    "rollout.sglang.api_key_env=HPT_TWO_NODE_KEY",
    "rollout.sglang.check_weights=true",
]


def _skip_without_sglang() -> None:
    require_sglang()


def _launch_nodes(out: Path, *overrides: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2"]
        cmd += [f"--node_rank={node}", "--nproc_per_node=1"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}"]
        cmd += ["-m", "hpt_megatron.cli", "train", hpt_train.TINY, f"run.output_dir={out}"]
        log = open(out.parent / f"node{node}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append(
            subprocess.Popen(
                [*cmd, *OVERRIDES, *overrides],
                cwd=hpt_train.ROOT,
                env=hpt_train.env(HPT_TWO_NODE_KEY=KEY),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def _wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.time() + timeout
    while step not in hpt_train.metrics(out):
        for node, proc in enumerate(procs):
            assert proc.poll() is None, _log(out, node)
        assert time.time() < deadline, f"step {step} not reached\n{_log(out, 0)}"
        time.sleep(0.5)


def _log(out: Path, node: int) -> str:
    return (out.parent / f"node{node}.log").read_text(errors="replace")[-6000:]


def _servers_of(out: Path) -> list[dict]:
    return json.loads((out / "sglang_logs" / "servers.json").read_text())


def _live_servers_serving(out: Path) -> list[int]:
    """PIDs of SGLang server processes whose command line names this run's folder."""
    return pids_with(b"sglang", str(out).encode())


def _no_server_left(out: Path, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while _live_servers_serving(out):
        assert time.time() < deadline, f"servers left running: {_live_servers_serving(out)}"
        time.sleep(0.5)


def test_two_nodes_each_serve_and_node1_restarts_its_server(tmp_path: Path) -> None:
    _skip_without_sglang()
    out = tmp_path / "run"
    # A cap, never reached: once node 1's server is back and has served again, the ranks get
    # SIGTERM (what Slurm sends) and the run stops cleanly after that step.
    procs = _launch_nodes(out, "run.steps=400", "checkpoint.save_every=0")
    try:
        _wait_for_step(out, 1, procs, timeout=900)
        servers = _servers_of(out)
        assert [s["node"] for s in servers] == [0, 1], servers
        os.killpg(servers[1]["pid"], signal.SIGKILL)  # node 1's server and its workers
        deadline = time.time() + 900
        served = None  # server 1's count once the driver has seen it go down
        while True:  # until the driver sends node 1's (restarted, resynced) server work again
            rows = hpt_train.metrics(out)
            last = rows[max(rows)]
            if last["rollout/server_restarts_total"] >= 1:
                count = last["rollout/requests/server_1"]
                if served is None:
                    served = count
                elif count > served:
                    break
            for node, proc in enumerate(procs):
                assert proc.poll() is None, _log(out, node)
            assert time.time() < deadline, f"node 1's server never served again\n{_log(out, 0)}"
            time.sleep(0.5)
        for proc in procs:
            _rank_of(proc).send_signal(signal.SIGTERM)
        for node, proc in enumerate(procs):
            assert proc.wait(timeout=600) == 0, _log(out, node)
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)  # the launch and its rank (in a session of its own)
    rows = hpt_train.metrics(out)
    steps = max(rows)
    assert sorted(rows) == list(range(1, steps + 1)) and steps < 400
    assert f"stopped by SIGTERM after step {steps}" in _log(out, 0)
    assert rows[1]["rollout/requests/server_0"] > 0 and rows[1]["rollout/requests/server_1"] > 0
    assert rows[steps]["rollout/server_restarts_total"] >= 1.0  # the driver saw the restart
    # Every load (step 0's, each step's, and the restarted server's resync) was read back from
    # the servers tensor for tensor (check_weights stops the run on a mismatch).
    assert all(r["rollout/checked_tensors"] > 0 for r in rows.values())
    node1_log = (out / "sglang_logs" / "node1_server_0.log").read_text()
    # Node 1 restarted its server once, on the same port. A first start whose free port another
    # process took (a loaded machine) moves port and starts again (``wait_healthy``): those starts
    # are on other ports.
    ports = re.findall(r"^==== .* --port (\d+)", node1_log, flags=re.MULTILINE)
    assert len(ports) >= 2 and ports[-1] == ports[-2], node1_log[-3000:]
    assert len(set(ports[:-1])) == len(ports) - 1, f"more than one restart: {ports}"
    assert _log(out, 1).count("restarting sglang server") == 1, _log(out, 1)  # by node 1's rank
    assert "restarting sglang server" not in _log(out, 0)  # not by the driver
    # The key is in no log (SGLang logs its server_args; ours blanks it).
    for path in [*out.rglob("*.log"), tmp_path / "node0.log", tmp_path / "node1.log"]:
        assert KEY not in path.read_text(errors="replace"), path
    _no_server_left(out)


def _rank_of(launch: subprocess.Popen) -> psutil.Process:
    """The ``hpt train`` rank under a torchrun launch."""
    for child in psutil.Process(launch.pid).children():
        with contextlib.suppress(psutil.Error):
            if "hpt_megatron.cli" in child.cmdline():
                return child
    raise AssertionError("no rank process under the launch")


def test_sigterm_of_both_launches_leaves_no_server(tmp_path: Path) -> None:
    _skip_without_sglang()
    out = tmp_path / "run"
    procs = _launch_nodes(out, "run.steps=50", "checkpoint.export_hf=false")
    try:
        _wait_for_step(out, 1, procs, timeout=900)
        pids = [s["pid"] for s in _servers_of(out)]
        assert all(Path(f"/proc/{pid}").exists() for pid in pids)
        for pid in pids:  # the key is on no command line
            assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        for proc in procs:
            # To the launches (torchrun): each passes it to its rank and SIGKILLs the rank if
            # it has not exited within its grace period; either way no server may outlive it.
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)  # the launch and its rank (in a session of its own)
    assert max(hpt_train.metrics(out)) < 50  # it stopped early, on the signal
    _no_server_left(out)
