"""Run a worker script on N gloo ranks and return its output; a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.forked import run_ranks
from tests.helpers.procs import free_port

__all__ = ["free_port", "launch", "torchrun"]


def launch(script: str | Path, *args: str, nproc: int = 2, timeout: int = 600) -> str:
    """``script ARGS`` on ``nproc`` local ranks with torchrun's worker environment, forked from a
    process that has already imported torch, Megatron and transformers (``tests/helpers/forked``);
    raise with every rank's output if one fails."""
    proc = run_ranks([str(script), *args], nproc=nproc, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{script} on {nproc} ranks failed ({proc.returncode}):\n{proc.stdout}\n"
            f"{proc.stderr[-8000:]}"
        )
    return proc.stdout


def torchrun(*argv: str, nproc: int = 2, timeout: int = 600) -> str:
    """``torchrun --nproc_per_node NPROC ARGV`` itself (the launcher a user types, for the tests
    of a command under it); raise with its output if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc.stdout
