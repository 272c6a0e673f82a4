"""Step time split of PPO with a critic and a KL reference against GRPO, on the tiny CPU run.

    python benchmarks/ppo_step_split.py [--steps 20] [--model-load CKPT] [--out DIR]

Trains the tiny CPU config (one process, TP=1) twice with the same seed and batch shape: GRPO
(the baseline) and PPO with ``kl_coef=0.01`` (critic + frozen reference). From each run's
``metrics.jsonl`` it takes the median over steps (the first two left out: start-up) of the step
time and its parts, and prints:

- ``ref / policy fwd+bwd``: the reference's forward (``time/ref_s``) over the policy's
  training forward and backward (``time/train_s``); FLOPs say about 1/3;
- ``critic / policy fwd+bwd``: the critic's forward plus its own update (``time/critic_s``) over
  the same; FLOPs say about 4/3 (a forward, then a forward and backward);
- ``PPO step / GRPO step``: whole steps, generation included.

``--model-load`` starts both runs from a Megatron checkpoint (e.g. an SFT run's), so the rollouts
have nonzero rewards; without it both start from the same random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("time/step_s", "time/generation_s", "time/train_s", "time/logprob_s")
PARTS += ("time/ref_s", "time/critic_s")


def _train(out: Path, steps: int, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "hpt_megatron.cli", "train", str(ROOT / "examples/tiny_cpu.yaml")]
    cmd += [
        f"run.output_dir={out}",
        f"run.steps={steps}",
        "parallel.tp=1",
        "run.val_every=0",
        "data.prompts_per_step=16",
        "rollout.n=4",
        "rollout.max_new_tokens=32",
        "logging.progress_bar=false",
        "checkpoint.save_every=0",
        "checkpoint.export_hf=false",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _medians(rows: list[dict]) -> dict[str, float]:
    rows = rows[2:] if len(rows) > 4 else rows
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in PARTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model-load", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ppo_split_"))
    start = [f"model.load={args.model_load}"] if args.model_load else []
    grpo = _medians(_train(out / "grpo", args.steps, [*start, "algorithm.preset=grpo"]))
    ppo_extra = [*start, "algorithm.preset=ppo", "algorithm.options.kl_coef=0.01"]
    ppo = _medians(_train(out / "ppo", args.steps, ppo_extra))
    print(f"median over steps 3..{args.steps} (seconds)")
    print(f"{'part':<22}{'grpo':>10}{'ppo+ref':>10}")
    for key in PARTS:
        print(f"{key:<22}{grpo[key]:>10.4f}{ppo[key]:>10.4f}")
    train = ppo["time/train_s"]
    print(f"ref / policy fwd+bwd     {ppo['time/ref_s'] / train:.3f}  (FLOPs: ~0.33)")
    print(f"critic / policy fwd+bwd  {ppo['time/critic_s'] / train:.3f}  (FLOPs: ~1.33)")
    print(f"PPO step / GRPO step     {ppo['time/step_s'] / grpo['time/step_s']:.3f}")


if __name__ == "__main__":
    main()
