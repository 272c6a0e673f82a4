"""``hpt train`` with ``rollout.engine=sglang``: a real SGLang server on CPU serves the rollouts of
a TP=2 run, receives the trainer's weights after every step, and the run validates on it."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest

from hpt_megatron.config.rollout import SGLangConfig
from tests.distributed.launch import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.sglang


def test_hpt_train_with_sglang_rollouts(tmp_path):
    python = SGLangConfig(device="cpu").python_executable()
    if not Path(python).exists():
        pytest.skip(f"SGLang environment not found ({python}): run `bash tools/sglang_env.sh`")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "hpt_megatron.cli",
        "train",
        str(ROOT / "examples" / "tiny_cpu.yaml"),
        f"run.output_dir={out}",
        "run.steps=3",
        "run.val_every=3",
        "run.val_max_prompts=8",
        "data.prompts_per_step=4",
        "rollout.n=4",
        "logging.progress_bar=false",
        "rollout.engine=sglang",
        "rollout.sglang.device=cpu",
        "rollout.sglang.max_total_tokens=4096",
        "rollout.sglang.extra_args=[--skip-server-warmup]",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
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
