"""Trainer-versus-rollout mismatch of a mixture-of-experts policy with and without routing replay.

    python benchmarks/routing_replay_mismatch.py --steps 3
    python benchmarks/routing_replay_mismatch.py --steps 3 --engine sglang

Runs ``hpt train`` on the tiny Qwen3-MoE of ``examples/tiny_moe_cpu.yaml`` (8 experts, top-2,
three MoE layers) with the CPU rollout engine, once per setting, from the same seed. With
``--engine sglang`` the rollouts come from a real SGLang server on CPU (tools/sglang_env.sh),
every layer of the model sparse (SGLang's own Qwen3-MoE needs that, see preflight), its dtype
set by ``rollout.sglang.dtype`` and the experts it routed returned by the server
(``rollout.sglang.routed_experts``). The settings:

- ``fp32``: rollouts in float32, like the trainer: the two agree almost exactly (the baseline);
- ``bf16``: rollouts in bfloat16 (``rollout.cpu.dtype``, ``rollout.sglang.dtype``), the trainer
  in float32, so routers whose top scores are close pick other experts for some tokens, as in
  practice;
- ``bf16+replay``: the same with ``algorithm.options.routing_replay: rollout``.

Each reports, per step and averaged over the steps, ``mismatch/logp_abs_diff_mean`` (mean
|trainer log-prob - rollout log-prob| over the on-policy response tokens, the trainer's pi_old
before the update) and, with replay, ``moe/replay_changed_frac`` (the share of (token, MoE
layer) pairs whose recorded top-k differs from the trainer router's own). Step 0 of the three
runs starts from the same weights and draws the same prompts; the later steps diverge as the runs
train differently. The preset is GRPO with a tiny entropy bonus, so that no row is left out of the
forward pass for a zero advantage (the metric then covers every generated token).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPLAY = "algorithm.options.routing_replay=rollout"
SETTINGS = {
    "cpu": {
        "fp32": [],
        "bf16": ["rollout.cpu.dtype=bfloat16"],
        "bf16+replay": ["rollout.cpu.dtype=bfloat16", REPLAY],
    },
    "sglang": {
        "fp32": ["rollout.sglang.dtype=float32"],
        "bf16": ["rollout.sglang.dtype=bfloat16"],
        "bf16+replay": [
            "rollout.sglang.dtype=bfloat16",
            "rollout.sglang.routed_experts=true",
            REPLAY,
        ],
    },
}
SGLANG_CPU = [
    "model.inline.mlp_only_layers=[]",
    "rollout.engine=sglang",
    "rollout.sglang.device=cpu",
    "rollout.sglang.max_total_tokens=8192",
    "rollout.sglang.extra_args=[--skip-server-warmup]",
]


def run(out: Path, args: argparse.Namespace, extra: list[str]) -> list[dict]:
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ep)),
        *("-m", "hpt_megatron.cli", "train", str(ROOT / "examples/tiny_moe_cpu.yaml")),
        *(f"run.steps={args.steps}", "run.val_every=0", "checkpoint.save_every=0"),
        *("checkpoint.export_hf=false", "logging.progress_bar=false", f"parallel.ep={args.ep}"),
        *("algorithm.preset=grpo", "algorithm.options.entropy_coef=1e-6"),
        *(f"data.prompts_per_step={args.prompts}", f"rollout.n={args.n}"),
        *(f"rollout.max_new_tokens={args.max_new_tokens}", "trainer.warmup_steps=0"),
        *(f"run.output_dir={out}", *extra),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
    metrics = out.glob("**/metrics.jsonl")
    return [json.loads(line) for line in next(metrics).read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--n", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ep", type=int, default=1, help="expert parallel size (= processes)")
    ap.add_argument("--engine", choices=sorted(SETTINGS), default="cpu", help="rollout engine")
    args = ap.parse_args()
    common = SGLANG_CPU if args.engine == "sglang" else []
    key, changed = "mismatch/logp_abs_diff_mean", "moe/replay_changed_frac"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in SETTINGS[args.engine].items():
            rows = [r for r in run(Path(tmp) / name, args, [*common, *extra]) if key in r]
            per_step = [r[key] for r in rows]
            results[name] = {
                "per_step": per_step,
                "mean": sum(per_step) / len(per_step),
                "replay_changed_frac": [r[changed] for r in rows if changed in r],
            }
            shown = " ".join(f"{v:.5f}" for v in per_step)
            print(f"{name:12s} {key} per step: {shown}", flush=True)
    base = results["bf16"]["mean"]
    print(json.dumps(results, indent=1))
    print(
        f"{args.engine}: mean |trainer - rollout| logp: "
        f"fp32 rollouts {results['fp32']['mean']:.5f}, "
        f"bf16 {base:.5f}, bf16 with replay {results['bf16+replay']['mean']:.5f} "
        f"(replay / no replay = {results['bf16+replay']['mean'] / base:.3f}); step 0 only: "
        f"{results['bf16']['per_step'][0]:.5f} -> {results['bf16+replay']['per_step'][0]:.5f}; "
        f"tokens x layers whose top-k differs under bf16: "
        f"{results['bf16+replay']['replay_changed_frac']}"
    )


if __name__ == "__main__":
    main()
