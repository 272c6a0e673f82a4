"""Time from a stalled collective to the watchdog's exit with stacks, against the configured bound.

    python benchmarks/watchdog_latency.py [--bound 10] [--poll 1.0] [--rounds 3]

Each round starts two gloo processes (torchrun); both pass a few all-reduces inside
``Watchdog.phase("broadcast")``, then rank 1 stops taking part (it sleeps) while rank 0 enters the
next all-reduce. Rank 0's watchdog (``fault.phase_timeout_s.broadcast = --bound``) must write its
report and end the process; the time from entering the collective to the exit call is reported,
with its ratio to the bound (the aim: under 2). The report is checked to name the collective.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(out: Path, bound: float, poll: float) -> None:
    import torch
    import torch.distributed as dist

    from hpt_megatron.config.fault import FaultConfig
    from hpt_megatron.orchestration.watchdog import Watchdog

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = FaultConfig(phase_timeout_s={"broadcast": bound}, watchdog_poll_s=poll)

    def exit_fn(code: int) -> None:
        (out / f"exit_{rank}.json").write_text(json.dumps({"t": time.time(), "code": code}))
        os._exit(code)

    dog = Watchdog(cfg, out, rank, dist.get_world_size(), exit_fn=exit_fn).start()
    for step in range(3):
        with dog.phase("broadcast", step):
            dist.all_reduce(torch.ones(1))
    if rank == 1:
        time.sleep(bound * 4)  # never joins; its own watchdog sees rank 0's FIRED and reports
        return
    (out / "stall.json").write_text(json.dumps({"t": time.time()}))
    with dog.phase("broadcast", 3):
        dist.all_reduce(torch.ones(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bound", type=float, default=10.0)
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), args.bound, args.poll)
        return
    latencies = []
    for _ in range(args.rounds):
        out = Path(tempfile.mkdtemp(prefix="hpt_wd_"))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_port()}",
            __file__,
            f"--bound={args.bound}",
            f"--poll={args.poll}",
            f"--worker={out}",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, capture_output=True, env=env, timeout=args.bound * 10)
        stall = json.loads((out / "stall.json").read_text())["t"]
        exit0 = json.loads((out / "exit_0.json").read_text())
        report = (out / "hang" / "0.txt").read_text()
        assert exit0["code"] == 3 and "all_reduce" in report, report[:2000]
        latencies.append(exit0["t"] - stall)
    med = statistics.median(latencies)
    print(
        json.dumps(
            {
                "bound_s": args.bound,
                "poll_s": args.poll,
                "stall_to_exit_s": [round(x, 2) for x in latencies],
                "median_s": round(med, 2),
                "ratio_to_bound": round(med / args.bound, 3),
            },
            indent=1,
        )
    )


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
