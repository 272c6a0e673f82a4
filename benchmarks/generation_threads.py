"""Generation time per step of ``hpt train`` on the embedded default: tp=2 (two processes) with
data-parallel generation (every rank's engine replica generating its share, the default), with one
engine on the driver given the idle rank's cores (``rollout.cpu.data_parallel=false``), and with
that engine on one thread (the first behaviour), against tp=1 in one process (all cores).

    python benchmarks/generation_threads.py --steps 12 --rounds 3
    python benchmarks/generation_threads.py --preset grpo --no-elision   # the peer benchmark's

Each layout runs ``--steps`` steps of ``examples/tiny_cpu.yaml`` (no validation, no checkpoints),
interleaved over ``--rounds`` rounds so that machine noise hits all of them alike; the figure is the
median of ``time/generation_s`` over the steps after the first of every round, and the ratios are
to tp=1 in the same run.
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

ONE_ENGINE = "rollout.cpu.data_parallel=false"
LAYOUTS = {  # name: (processes, overrides)
    "tp=1, 1 process": (1, ["parallel.tp=1"]),
    "tp=2, one engine, 1 thread": (2, ["parallel.tp=2", ONE_ENGINE, "rollout.cpu.threads=1"]),
    "tp=2, one engine, idle cores": (2, ["parallel.tp=2", ONE_ENGINE]),
    "tp=2, data-parallel (default)": (2, ["parallel.tp=2"]),
}


def run_layout(procs: int, overrides: list[str], steps: int, out: Path) -> list[float]:
    """``time/generation_s`` of each step after the first."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)),
        *("-m", "hpt_megatron.cli", "train", str(ROOT / "examples/tiny_cpu.yaml")),
        *(f"run.steps={steps}", "run.val_every=0", "checkpoint.save_every=0"),
        *("checkpoint.export_hf=false", f"run.output_dir={out}", "logging.progress_bar=false"),
        *overrides,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["time/generation_s"] for r in rows[1:]]  # step 1 warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", default="hpt", help="algorithm.preset (the example's: hpt)")
    ap.add_argument(
        "--no-elision", action="store_true", help="trainer.elide_zero_rows=false (every row trains)"
    )
    args = ap.parse_args()
    common = [f"algorithm.preset={args.preset}"]
    if args.no_elision:
        common.append("trainer.elide_zero_rows=false")
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, (procs, overrides)) in enumerate(LAYOUTS.items()):
                out = Path(tmp) / f"r{r}_{i}"
                times[name] += run_layout(procs, [*common, *overrides], args.steps, out)
    base = statistics.median(times["tp=1, 1 process"])
    print(f"generation s/step, median over {args.rounds} rounds x {args.steps - 1} steps:")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:32} {med:6.3f} s   speed vs tp=1: {base / med:5.2f}x")


if __name__ == "__main__":
    main()
