"""``hpt train`` with ``rollout.engine=sglang``: a real SGLang server on CPU serves the rollouts of
a TP=2 run, receives the trainer's weights after every step, and the run validates on it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import hpt_train
from tests.helpers.sglang_cpu import require_sglang

pytestmark = pytest.mark.sglang


def test_hpt_train_with_sglang_rollouts(tmp_path):
    require_sglang()
    out = tmp_path / "run"
    overrides = ["run.steps=3", "run.val_every=3", "run.val_max_prompts=8"]
    overrides += ["data.prompts_per_step=4", "rollout.n=4", "logging.progress_bar=false"]
    hpt_train.run(hpt_train.TINY, out, *overrides, *hpt_train.SGLANG_CPU, timeout=900)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["response/length_mean"] > 0 and r["time/weight_sync_s"] > 0 for r in rows)
    assert "val/accuracy" in rows[-1]
    # The weights the server loaded after the last step (version 3) are the exported policy.
    from safetensors.torch import load_file

    synced: dict = {}
    for shard in sorted((out / "rollout_weights" / "v3").glob("*.safetensors")):
        synced.update(load_file(shard))
    final: dict = {}
    for shard in sorted((out / "hf").glob("*.safetensors")):
        final.update(load_file(shard))
    assert synced.keys() == final.keys() and synced
    for name, tensor in final.items():
        assert synced[name].float().equal(tensor.float()), name
    assert (out / "sglang_logs").is_dir()


def test_moe_at_ep2_trains_with_the_experts_sglang_routed(tmp_path):
    """Qwen3-MoE (every layer sparse) at EP=2 with SGLang rollouts in bfloat16 and routing
    replay: the server returns each token's experts, the saved batch carries them, the fp32
    trainer's routers replay them (some differ from its own choices) and the MoE metrics come."""
    require_sglang()
    from hpt_megatron.data.sample import RolloutBatch

    out = tmp_path / "moe"
    overrides = ["run.steps=2", "run.val_every=0", "checkpoint.save_every=0"]
    overrides += ["data.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=16"]
    overrides += ["logging.progress_bar=false", "logging.save_rollouts=true"]
    overrides += ["model.inline.mlp_only_layers=[]", "rollout.sglang.dtype=bfloat16"]
    overrides += ["rollout.sglang.routed_experts=true", "algorithm.options.routing_replay=rollout"]
    # GRPO with an entropy bonus trains every generated row (see tests/e2e/test_moe_train.py).
    overrides += ["algorithm.preset=grpo", "algorithm.options.entropy_coef=1e-6"]
    hpt_train.run(hpt_train.TINY_MOE, out, *overrides, *hpt_train.SGLANG_CPU, timeout=900)
    rows = hpt_train.metrics(out)
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert row["moe/load_balancing_loss"] > 0.5 and row["grad_norm"] > 0
        assert 0 < row["moe/replay_changed_frac"] < 0.5, row  # bf16 flips a few choices
        assert row["mismatch/logp_abs_diff_mean"] > 0
    batch = RolloutBatch.load_jsonl(next((out / "rollouts").glob("step_*.jsonl")))
    assert batch.samples
    for sample in batch.samples:  # four MoE layers, top-2 of 8 experts
        assert sample.routed_experts is not None
        assert tuple(sample.routed_experts.shape) == (sample.num_tokens - 1, 4, 2)
        assert int(sample.routed_experts.max()) < 8


def _sglang_servers_under(root_pid: int) -> list[int]:
    """PIDs of ``sglang.launch_server`` processes descending from ``root_pid`` (from /proc)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root_pid:
                return True
            pid = parents.get(pid, 0)
        return False

    return [p for p, cmd in commands.items() if b"sglang.launch_server" in cmd and descends(p)]


def test_run_goes_on_when_the_server_is_killed_during_the_run(tmp_path):
    """SIGKILL the SGLang server once step 1 is logged: the client re-sends its requests, the
    server is restarted with the current weights, every step is trained, and the restart is
    counted in ``rollout/server_restarts_total``."""
    import os
    import signal
    import time

    require_sglang()
    out = tmp_path / "run"
    overrides = ["parallel.tp=1", "run.steps=4", "run.val_every=0", "checkpoint.export_hf=false"]
    overrides += ["data.prompts_per_step=4", "rollout.n=4", "logging.progress_bar=false"]
    proc = subprocess.Popen(
        hpt_train.command(hpt_train.TINY, out, *overrides, *hpt_train.SGLANG_CPU, nproc=1),
        cwd=hpt_train.ROOT,
        env=hpt_train.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-5000:] if proc.stderr else ""
        time.sleep(0.2)
    servers = _sglang_servers_under(proc.pid)
    assert len(servers) == 1, servers
    os.killpg(servers[0], signal.SIGKILL)  # the server and its scheduler processes
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-5000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["rollout/server_restarts_total"] == 0.0
    assert rows[-1]["rollout/server_restarts_total"] == 1.0
    assert all(r["response/length_mean"] > 0 for r in rows)
