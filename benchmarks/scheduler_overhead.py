"""Share of step time spent outside generation, grading, log-prob recomputation and training
compute in an ``hpt train`` run (the scheduler's own overhead and waiting).

    torchrun --nproc_per_node 2 -m hpt_megatron.cli train examples/tiny_cpu.yaml
    python benchmarks/scheduler_overhead.py runs/tiny_cpu/metrics.jsonl

Weight sync and validation are reported separately: weight sync is the transfer the design
requires after every step; validation is periodic evaluation, not scheduling.
"""

from __future__ import annotations

import argparse
import json

WORK = ("time/generation_s", "time/grading_s", "time/logprob_s", "time/train_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("metrics", help="a run's metrics.jsonl")
    args = ap.parse_args()
    rows: dict[int, dict] = {}
    with open(args.metrics) as fh:
        for line in fh:
            row = json.loads(line)
            rows[row["step"]] = row  # a resumed run re-logs steps: keep the last
    total = sum(r["time/step_s"] for r in rows.values())
    parts = {k: sum(r.get(k, 0.0) for r in rows.values()) for k in WORK}
    sync = sum(r.get("time/weight_sync_s", 0.0) for r in rows.values())
    val = sum(r.get("time/validation_s", 0.0) for r in rows.values())
    other = total - sum(parts.values()) - sync - val
    print(f"steps: {len(rows)}   step time: {total:.1f} s")
    for key, value in parts.items():
        print(f"  {key:22} {value:8.1f} s  {value / total:6.1%}")
    print(f"  {'time/weight_sync_s':22} {sync:8.1f} s  {sync / total:6.1%}")
    print(f"  {'time/validation_s':22} {val:8.1f} s  {val / total:6.1%}")
    print(f"scheduler overhead and waiting: {other:.1f} s = {other / total:.2%} of step time")
    print(f"  (counting weight sync as overhead too: {(other + sync) / total:.2%})")


if __name__ == "__main__":
    main()
