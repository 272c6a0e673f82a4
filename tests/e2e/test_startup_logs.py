"""What ``hpt train`` logs (two processes under torchrun, one step): one INFO line per start-up
phase in order, the run directory first and the export path last, warm-up explained, each
third-party warning once."""

from __future__ import annotations

import pytest

from tests.helpers import hpt_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # whole `hpt train` runs


def test_one_line_per_phase_and_each_warning_once(tmp_path):
    out = tmp_path / "run"
    small = ["run.steps=1", "run.val_every=0", "data.prompts_per_step=2", "rollout.n=2"]
    small += ["rollout.max_new_tokens=8", "logging.progress_bar=false", "trainer.warmup_steps=5"]
    proc = hpt_train.run(hpt_train.TINY, out, *small, launcher="torchrun", timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("INFO hpt", "WARN"))]
    phases = [
        f"INFO hpt_megatron: config {hpt_train.TINY} with 8 override(s): run directory {out} "
        "(world size 2)",
        "INFO hpt_megatron.trainer.run: model: llama, 0.5413 M parameters (tp 2 x pp 1",
        "INFO hpt_megatron.trainer.run: trainer.warmup_steps=5: update k uses lr 0.003 * (k-1)/5",
        "INFO hpt_megatron.orchestration.driver: data: train arithmetic: 5000 prompts",
        "INFO hpt_megatron.orchestration.driver: rollout engine cpu ready (colocated",
        "INFO hpt_megatron.trainer.run: no checkpoint to resume from (run.resume=auto)",
        "INFO hpt_megatron.orchestration.driver: step 1: generating 4 responses (2 prompts x 2",
        "INFO hpt_megatron.orchestration.driver: step 1: generated in",
        f"INFO hpt_megatron.trainer.run: exported the final policy as a Hugging Face folder: {out}",
    ]
    infos = [line for line in lines if line.startswith("INFO")]
    found = [next((i for i, line in enumerate(infos) if line.startswith(p)), -1) for p in phases]
    assert -1 not in found and found == sorted(found), "\n".join(infos)
    warned = [line for line in lines if line.startswith("WARNING UserWarning")]
    assert len(warned) == len(set(warned)), "\n".join(warned)  # each once, rank 1's not at all
    assert sum("Transformer Engine and Apex are not installed" in w for w in warned) <= 1
