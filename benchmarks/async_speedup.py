"""Wall time per trained sample: asynchronous training (``run.placement=disaggregated``,
``run.max_staleness=k``) versus colocated, with rollouts on a real SGLang server on CPU (its own
process, so generation and training can overlap).

    python benchmarks/async_speedup.py --steps 8 --k 2 --rounds 2

Both runs train the embedded default (``examples/tiny_cpu.yaml``) with ``--preset`` (LUFFY by
default: every group trains its generated rollouts and a demonstration, so both generation and
training do real work from a random start) for the same number of steps, one trainer process
(tp=1) beside the SGLang server, no validation or checkpoints, interleaved over ``--rounds``. The
figure is the run's wall time from its first step to its last over the rows it trained, as a
ratio colocated / async; with it, the share of step time the trainer waited for a batch
(``time/rollout_wait_s``) and, for the async run, the share of the producer's time it waited for
the staleness bound or loaded weights (``time/producer_wait_s``, ``time/producer_load_s``).
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
SGLANG = [
    "rollout.engine=sglang",
    "rollout.sglang.device=cpu",
    "rollout.sglang.max_total_tokens=8192",
    "rollout.sglang.extra_args=[--skip-server-warmup]",
]


def run(out: Path, steps: int, extra: list[str]) -> list[dict]:
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"),
        *("-m", "hpt_megatron.cli", "train", str(ROOT / "examples/tiny_cpu.yaml")),
        *(f"run.steps={steps}", "run.val_every=0", "checkpoint.save_every=0"),
        *("checkpoint.export_hf=false", "logging.progress_bar=false", "parallel.tp=1"),
        *(f"run.output_dir={out}", *SGLANG, *extra),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarise(name: str, runs: list[list[dict]]) -> float:
    rows = [r for run_rows in runs for r in run_rows[1:]]  # step 1: the server's first requests
    wall = sum(r["time/step_s"] for r in rows)
    trained = sum(r["train/rows"] for r in rows)
    wait = sum(r.get("time/rollout_wait_s", 0.0) for r in rows) / wall
    line = f"  {name:24} {1e3 * wall / trained:7.2f} ms/sample   trainer waits {wait:6.1%}"
    if "time/producer_wait_s" in rows[0]:
        gen = sum(r["time/generation_s"] + r["time/grading_s"] for r in rows)
        idle = sum(r["time/producer_wait_s"] for r in rows)
        load = sum(r["time/producer_load_s"] for r in rows)
        busy = gen + idle + load
        line += f"   producer waits {idle / busy:6.1%}, loads weights {load / busy:6.1%}"
        staleness = max(r["rollout/staleness_max"] for r in rows)
        line += f"   staleness max {staleness:.0f}"
    print(line)
    return wall / trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--preset", default="luffy")
    args = ap.parse_args()
    preset = [f"algorithm.preset={args.preset}"]
    stale = [f"run.max_staleness={args.k}", "run.placement=disaggregated"]
    colocated: list[list[dict]] = []
    async_rows: list[list[dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            colocated.append(run(Path(tmp) / f"colocated{r}", args.steps, preset))
            async_rows.append(run(Path(tmp) / f"async{r}", args.steps, preset + stale))
    print(
        f"{args.preset}, {args.rounds} rounds x {args.steps} steps (first of each not counted), "
        "SGLang CPU server + 1 trainer process:"
    )
    base = summarise("colocated", colocated)
    fast = summarise(f"async k={args.k}", async_rows)
    print(f"async speed-up per trained sample: {base / fast:.2f}x")


if __name__ == "__main__":
    main()
