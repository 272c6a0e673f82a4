"""Run ``hpt`` or a distributed worker script in processes forked from a server that has already
imported the trainer.

Importing torch, Megatron and transformers costs several seconds of CPU a process, and a test that
launches dozens of short runs would pay it for every rank of every launch. ``multiprocessing``'s
forkserver imports ``PRELOAD`` once in a clean process (no torch threads started) and forks each
process from it:

- :func:`run_cli`: ``hpt ARGV`` in one process (a world of one, without torchrun);
- :func:`run_ranks`: a script on N local ranks with the environment torchrun gives its
  workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``), so ``init_distributed`` builds the same gloo groups as under torchrun. As
  torchrun does, a rank that fails ends the others.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import socket
import sys
import tempfile
import time
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
_RANK_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _redirect(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _child(argv: list[str], log_path: str) -> None:
    _redirect(log_path)
    for name in _RANK_ENV:
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


def _rank(script: str, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    fd_err = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd_out, 1)
    os.dup2(fd_err, 2)
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))  # as ``python script.py`` puts it first
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(script: str | Path, *args: str, nproc: int = 2, timeout: float = 600) -> str:
    """``script ARGS`` on ``nproc`` local ranks forked after the imports; returns their stdout
    (the other ranks' first, rank 0's last, so its final line is the output's last); raises with
    every rank's output when one fails or the launch runs past ``timeout``."""
    port = str(_free_port())
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        procs, outs = [], []
        for rank in range(nproc):
            env = {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
            }
            out, err = f"{logs}/out{rank}", f"{logs}/err{rank}"
            proc = _CTX.Process(target=_rank, args=(str(script), list(args), env, out, err))
            proc.start()
            procs.append(proc)
            outs.append((out, err))
        failed = _wait_all(procs, timeout)
        texts = [(Path(o).read_text(), Path(e).read_text()) for o, e in outs]
    if failed is not None:
        report = "\n".join(
            f"--- rank {r} stdout:\n{o}\n--- rank {r} stderr:\n{e[-6000:]}"
            for r, (o, e) in enumerate(texts)
        )
        raise RuntimeError(f"{script} on {nproc} ranks failed ({failed}):\n{report}")
    return "".join(o for o, _ in texts[1:]) + texts[0][0]


def _wait_all(procs: list, timeout: float) -> str | None:
    """Wait for every rank; on the first failure (or at the timeout) end the others, as torchrun
    does. Returns None when all exited 0, else what went wrong."""
    deadline = time.monotonic() + timeout
    failed = None
    while any(p.is_alive() for p in procs):
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if bad:
            failed = f"rank {bad[0][0]} exited {bad[0][1]}"
            break
        if time.monotonic() > deadline:
            failed = f"ran past {timeout} s"
            break
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    if failed is None:
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            failed = f"rank {bad[0][0]} exited {bad[0][1]}"
    return failed
