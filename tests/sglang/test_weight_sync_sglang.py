"""Weight sync into real SGLang servers on CPU from PP=2 runs.

- Disk, disaggregated: each pipeline stage writes its own shards, the producer thread has the
  server load the folder, and older versions are removed once a newer one is loaded.
- ``weight_sync: distributed`` and ``tensor``, colocated, two servers: each stage broadcasts
  into its update group with both (``tensor``: posts handles to its buckets' shared memory);
  every tensor is read back equal after every push (``check_weights``); a server SIGKILLed
  mid-run is restarted, held out of generation, resynced by the next push (into fresh groups),
  and serves again; nothing is left running after the run, and no shared-memory file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import hpt_train
from tests.helpers.procs import pids_with
from tests.helpers.sglang_cpu import require_sglang, sglang_servers_under

pytestmark = [pytest.mark.sglang, pytest.mark.slow]


@pytest.mark.timeout(1800)  # a CPU server's start-up alone can take minutes on a busy host
def test_pp2_disaggregated_run_syncs_every_stage_into_the_server(tmp_path):
    require_sglang()
    out = tmp_path / "run"
    overrides = ["parallel.tp=1", "parallel.pp=2", "run.placement=disaggregated"]
    overrides += ["run.max_staleness=1", "run.steps=3", "run.val_every=0"]
    overrides += ["data.prompts_per_step=4", "rollout.n=4", "logging.progress_bar=false"]
    hpt_train.run(hpt_train.TINY, out, *overrides, *hpt_train.SGLANG_CPU, timeout=1500)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["response/length_mean"] > 0 for r in rows)
    sync = out / "rollout_weights"
    # The producer loads the newest queued push before each batch; the trainer's last one
    # (version 3) comes after the last batch and stays queued. Each load removed the older
    # folders: v0 always goes (v1 or v2 was loaded), v1 too when v2 was.
    versions = sorted(p.name for p in sync.iterdir() if p.name.startswith("v"))
    assert versions in (["v1", "v2", "v3"], ["v2", "v3"]), versions
    v3 = sync / "v3"
    shards = sorted(p.name for p in v3.glob("*.safetensors"))
    assert {s.rsplit("-", 1)[0] for s in shards} == {"model-pp0", "model-pp1"}  # both stages
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= {
        p.name for p in v3.iterdir()
    }
    from hpt_megatron.models.hf_io import HFCheckpointReader

    synced, final = HFCheckpointReader(v3), HFCheckpointReader(out / "hf")
    assert sorted(synced.weight_map) == sorted(final.weight_map)
    for name in final.weight_map:
        assert synced.get(name).float().equal(final.get(name).float()), name


GATED = "tests.helpers.gated_reward:held_while_gated"  # holds grading while a file exists


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended waiting for {what}:\n{log.read_text()[-5000:]}"
        assert time.time() < deadline, f"no {what} in {timeout} s:\n{log.read_text()[-5000:]}"
        time.sleep(0.2)


def _orphan_shm_files() -> set[str]:
    """torch's shared-memory files (``torch_<pid>_...``, the ``file_system`` strategy's, which
    ``tensor`` uses) whose creating process is gone: left behind, not in use by a test beside
    this one."""
    return {
        p.name
        for p in Path("/dev/shm").glob("torch_*")
        if not Path(f"/proc/{p.name.split('_')[1]}").exists()
    }


@pytest.mark.timeout(1800)  # two CPU servers' start-up alone can take minutes on a busy host
@pytest.mark.parametrize("transport", ["distributed", "tensor"])
def test_pp2_server_sync_reads_back_equal_and_resyncs_a_killed_server(
    tmp_path: Path, transport: str
) -> None:
    """Grading is held (``gated_reward``) so that the kill lands at a known point: server B is
    SIGKILLed while step 1 grades (its rollouts done); the run notices it (a request or the
    push), restarts it, and the test holds the next grading until the restarted server is
    held out of generation, so a push after it resyncs it and a later step's rollouts reach it."""
    require_sglang()
    out = tmp_path / "run"
    gate, log = tmp_path / "gate", tmp_path / "run.log"
    overrides = ["parallel.tp=1", "parallel.pp=2", "run.placement=colocated", "run.steps=3"]
    overrides += ["run.val_every=0", "checkpoint.save_every=0", "logging.progress_bar=false"]
    overrides += ["data.prompts_per_step=4", "rollout.n=4", *hpt_train.SGLANG_CPU]
    overrides += ["rollout.sglang.servers_per_node=2", "rollout.sglang.router=false"]
    overrides += [f"rollout.sglang.weight_sync={transport}", "rollout.sglang.check_weights=true"]
    overrides += [f"reward.fn={GATED}", "reward.timeout_s=900"]
    # The held step waits for a server's restart (minutes on a busy host): above the watchdog's
    # 600 s floor for a phase seen before.
    overrides += ["fault.phase_timeout_s={rollout: 1800, broadcast: 1800}"]
    gate.touch()
    shm_before = _orphan_shm_files()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            hpt_train.command(hpt_train.TINY, out, *overrides, nproc=2),
            cwd=hpt_train.ROOT,
            env=hpt_train.env(HPT_TEST_GATE=str(gate)),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for("graded step 1", (tmp_path / "held").exists, proc, log)
        servers = sglang_servers_under(proc.pid)
        assert len(servers) == 2, servers
        cmdline = Path(f"/proc/{servers[1]}/cmdline").read_bytes().split(b"\0")
        port = int(cmdline[cmdline.index(b"--port") + 1])
        url = re.findall(rf"sglang server pid \d+ starting at (\S+:{port})\b", log.read_text())[0]
        os.killpg(servers[1], signal.SIGKILL)  # the server and its scheduler
        gate.unlink()
        _wait_for(
            "restart", lambda: f"restarting sglang server at {url}" in log.read_text(), proc, log
        )
        gate.touch()  # the next grading waits until the restarted server is up and held
        held = f"sglang server {url} restarted: held out of generation"
        _wait_for("held server", lambda: held in log.read_text(), proc, log)
        gate.unlink()
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    finally:
        gate.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    rows = hpt_train.metrics(out)
    assert sorted(rows) == [1, 2, 3]
    resynced = re.findall(rf"sglang server {re.escape(url)} resynced to version (\d+)", text)
    assert len(resynced) == 1 and int(resynced[0]) in (1, 2), text[-5000:]
    # Every push (step 0's, each step's, the resync's) read every tensor back from every server
    # it reached, equal in the precision the server runs in, or the run would have stopped.
    assert all(r["rollout/checked_tensors"] > 0 for r in rows.values())
    assert rows[3]["rollout/server_restarts_total"] == 1.0
    logs = sorted((out / "sglang_logs").glob("sglang_server_*.log"))
    index = next(i for i, p in enumerate(logs) if re.search(rf"--port {port}\b", p.read_text()))
    served = [rows[s][f"rollout/requests/server_{index}"] for s in (1, 2, 3)]
    # It served step 1, and again after its resync (before the push of version 1 or 2).
    assert served[0] > 0 and served[2] > served[int(resynced[0]) - 1], served
    deadline = time.time() + 30
    while pids_with(b"sglang", str(out).encode()):  # no server outlives the run
        assert time.time() < deadline, pids_with(b"sglang", str(out).encode())
        time.sleep(0.5)
    assert not _orphan_shm_files() - shm_before  # every push's shared memory was freed


@pytest.mark.timeout(1800)
def test_partial_rollouts_through_the_router_continue_across_a_push(tmp_path: Path) -> None:
    """Disaggregated, staleness 1, ``rollout.partial``, two servers behind the router, each
    running one request at a time (so that a batch's generation outlasts a training step and
    the trainer's push lands in it): the push aborts the requests in flight, which continue
    under the new weights. Some responses carry tokens of two versions, each token with the
    log-prob it was sampled with (what the corrections read); the router keeps a prompt's
    samples on one server and counts each server's requests."""
    require_sglang()
    out = tmp_path / "run"
    overrides = ["parallel.tp=1", "run.placement=disaggregated", "run.max_staleness=1"]
    overrides += [
        "algorithm.preset=grpo",
        "run.steps=4",
        "run.val_every=0",
        "checkpoint.save_every=0",
    ]
    overrides += ["data.prompts_per_step=4", "rollout.n=4", "logging.progress_bar=false"]
    overrides += ["rollout.partial=true", "logging.save_rollouts=true", *hpt_train.SGLANG_CPU]
    overrides += ["rollout.sglang.servers_per_node=2", "rollout.sglang.router=true"]
    overrides += ["rollout.sglang.extra_args=[--skip-server-warmup,--max-running-requests=1]"]
    hpt_train.run(hpt_train.TINY, out, *overrides, timeout=1500)
    rows = hpt_train.metrics(out)
    assert sorted(rows) == [1, 2, 3, 4]
    mixed = [s for s, r in rows.items() if r["rollout/partial_frac"] > 0]
    assert mixed, {s: r["rollout/partial_frac"] for s, r in rows.items()}
    assert all(rows[s]["rollout/weight_versions"] >= 2 for s in mixed)
    continued = []
    for path in sorted((out / "rollouts").glob("step_*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if len(set(row.get("token_versions") or [])) > 1:
                continued.append(row)
    assert continued
    for row in continued:
        assert len(row["token_versions"]) == len(row["response_ids"])
        assert len(row["rollout_logprobs"]) == len(row["response_ids"])
        assert row["token_versions"] == sorted(row["token_versions"])  # older tokens first
    last = rows[4]
    served = [last["rollout/requests/server_0"], last["rollout/requests/server_1"]]
    assert all(count > 0 for count in served), served
    for step, row in rows.items():  # each prompt placed once; its other requests (samples,
        # continuations) all sent to the same worker (the counts are the run's so far)
        assert row["rollout/router/new_prompts"] == 4 * step, row
        routed = row["rollout/requests/router"]
        assert row["rollout/router/same_worker"] == routed - 4 * step, row
