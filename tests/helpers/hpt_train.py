"""``hpt train`` as a torchrun subprocess, and the metrics it logged, for the end-to-end tests."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from tests.distributed.launch import free_port
from tests.helpers.forked import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "tiny_cpu.yaml")
TINY_MOE = str(ROOT / "examples" / "tiny_moe_cpu.yaml")
# Rollouts on one real SGLang server on CPU (the tier of tests/sglang).
SGLANG_CPU = [
    "rollout.engine=sglang",
    "rollout.sglang.device=cpu",
    "rollout.sglang.max_total_tokens=4096",
    "rollout.sglang.extra_args=[--skip-server-warmup]",
]


def command(
    config: str | pathlib.Path,
    out: pathlib.Path,
    *overrides: str,
    nproc: int = 2,
    restarts: int = 0,
    rendezvous: str = "static",
) -> list[str]:
    """The torchrun command line of ``hpt train CONFIG run.output_dir=OUT OVERRIDES...`` on
    ``nproc`` local processes; ``rendezvous`` is ``static`` (master address and port) or
    ``c10d`` (torchrun's elastic rendezvous on a free loopback port)."""
    port = free_port()
    if rendezvous == "static":
        where = ["--master_addr=127.0.0.1", f"--master_port={port}"]
    elif rendezvous == "c10d":
        where = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    else:
        raise ValueError(f"rendezvous must be 'static' or 'c10d', not {rendezvous!r}")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if restarts:
        launcher.append(f"--max-restarts={restarts}")
    train = ["-m", "hpt_megatron.cli", "train", str(config), f"run.output_dir={out}"]
    return [*launcher, *where, *train, *overrides]


def env(**extra: str) -> dict[str, str]:
    """The environment of a test run: one thread per process, unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run(
    config: str | pathlib.Path,
    out: pathlib.Path,
    *overrides: str,
    nproc: int = 2,
    timeout: float = 600,
    launcher: str = "forked",
) -> subprocess.CompletedProcess:
    """Run ``hpt train`` to the end; fail the test with the tail of its stderr unless it exits 0.

    ``launcher``: ``forked`` runs the ranks forked after the imports with torchrun's worker
    environment (``tests/helpers/forked.run_ranks``: the same processes and process groups,
    without paying the imports of every rank of every run); ``torchrun`` launches them with
    ``torchrun`` itself, as a user does."""
    if launcher == "torchrun":
        proc = subprocess.run(
            command(config, out, *overrides, nproc=nproc),
            capture_output=True,
            text=True,
            env=env(),
            timeout=timeout,
            cwd=ROOT,
        )
    elif launcher == "forked":
        argv = ["-m", "hpt_megatron.cli", "train", str(config), f"run.output_dir={out}"]
        extra = {"PYTHONUNBUFFERED": "1"}
        proc = run_ranks([*argv, *overrides], nproc=nproc, timeout=timeout, extra_env=extra)
    else:
        raise ValueError(f"launcher must be 'forked' or 'torchrun', not {launcher!r}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def metrics(out: pathlib.Path) -> dict[int, dict]:
    """The record of every step in ``OUT/metrics.jsonl`` (a resumed run cut the file to its
    step first); empty while the file does not exist yet."""
    rows: dict[int, dict] = {}
    path = out / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    return rows
