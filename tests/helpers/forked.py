"""Run ``hpt train`` in a process forked from a server that has already imported the trainer.

Importing torch, Megatron and transformers costs several seconds a process; a test that trains
dozens of short runs pays it once: ``multiprocessing``'s forkserver imports ``PRELOAD`` in a clean
process (no torch threads started) and forks each run from it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

PRELOAD = [
    "hpt_megatron.cli",
    "hpt_megatron.orchestration.loop",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.dist_checkpointing",
    "transformers.models.llama.modeling_llama",
]
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(PRELOAD)


def _child(argv: list[str], log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    import torch

    torch.set_num_threads(1)
    from hpt_megatron.cli import main

    # sys.exit (not os._exit): multiprocessing then runs the exit finalizers, which shut down the
    # helper processes a run started (Megatron's checkpoint writer starts a Manager server).
    sys.exit(main(argv))


def run_cli(argv: list[str], log_path: Path, timeout: float = 300) -> tuple[int, str]:
    """``hpt ARGV`` in a forked process; returns (exit code, its stdout and stderr)."""
    proc = _CTX.Process(target=_child, args=(argv, str(log_path)))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"hpt {' '.join(argv)} ran past {timeout} s:\n{log_path.read_text()}")
    return int(proc.exitcode or 0), log_path.read_text()
