"""``hpt train`` with ``rollout.engine=sglang``: a real SGLang server on CPU serves the rollouts of
a TP=2 run, receives the trainer's weights after every step, is restarted when killed, and the run
validates on it; Qwen3-MoE at EP=2 trains with the experts SGLang routed."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import hpt_train
from tests.helpers.sglang_cpu import require_sglang, sglang_servers_under
from tests.helpers.tiny_hf import assert_same_hf_weights

# A CPU server's start-up alone can take minutes on a busy host (as in the other SGLang modules).
pytestmark = [pytest.mark.sglang, pytest.mark.timeout(1800)]


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


@pytest.fixture(scope="module")
def killed_server_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One TP=2 run (under torchrun) on a real CPU server, whose server is SIGKILLed once step 1
    is logged; the tests below read their assertions from it."""
    import os
    import signal
    import time

    require_sglang()
    out = tmp_path_factory.mktemp("sglang_train") / "run"
    overrides = ["parallel.tp=2", "run.steps=4", "run.val_every=4", "run.val_max_prompts=8"]
    overrides += ["data.prompts_per_step=4", "rollout.n=4", "logging.progress_bar=false"]
    proc = subprocess.Popen(
        hpt_train.command(hpt_train.TINY, out, *overrides, *hpt_train.SGLANG_CPU, nproc=2),
        cwd=hpt_train.ROOT,
        env=hpt_train.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-5000:] if proc.stderr else ""
            time.sleep(0.2)
        servers = sglang_servers_under(proc.pid)
        if len(servers) == 1:
            os.killpg(servers[0], signal.SIGKILL)  # the server and its scheduler processes
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    rows = [json.loads(line) for line in lines]
    return {"out": out, "servers": servers, "code": proc.returncode, "err": err, "rows": rows}


def test_tp2_run_trains_on_sglang_rollouts_and_syncs_every_step(killed_server_run):
    """Every step's rollouts come from the server, which loads the trainer's weights after every
    step (the last load equals the HF export) and serves the validation."""
    run = killed_server_run
    out, rows = run["out"], run["rows"]
    assert run["code"] == 0, run["err"][-5000:]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["response/length_mean"] > 0 and r["time/weight_sync_s"] > 0 for r in rows)
    assert "val/accuracy" in rows[-1]
    # The weights the server loaded after the last step (version 4) are the exported policy.
    assert_same_hf_weights(out / "rollout_weights" / "v4", out / "hf")
    assert (out / "sglang_logs").is_dir()


def test_run_goes_on_when_the_server_is_killed_during_the_run(killed_server_run):
    """The SIGKILL after step 1: the client re-sends its requests, the server is restarted with
    the current weights, every step is trained, and the restart is counted in
    ``rollout/server_restarts_total``."""
    run = killed_server_run
    assert len(run["servers"]) == 1, run["servers"]
    assert run["code"] == 0, run["err"][-5000:]
    rows = run["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["rollout/server_restarts_total"] == 0.0
    assert rows[-1]["rollout/server_restarts_total"] == 1.0
    assert all(r["response/length_mean"] > 0 for r in rows)
