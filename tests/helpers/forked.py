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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.procs import free_port

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


def _rank(argv: list[str], env: dict[str, str], out: str, err: str, cwd: str) -> None:
    os.chdir(cwd)
    fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    fd_err = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd_out, 1)
    os.dup2(fd_err, 2)
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    try:
        if argv[0] == "-m":  # as ``python -m MODULE ARGS``
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:  # as ``python SCRIPT ARGS``, which puts the script's folder first on the path
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).parent))
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def start_ranks(
    argv: list[str], nproc: int, logs: str, extra_env: dict[str, str] | None = None
) -> list:
    """Fork ``nproc`` ranks of ``python ARGV`` (``ARGV`` a script and its arguments, or ``-m
    MODULE ...``) with torchrun's worker environment; rank R writes ``LOGS/out<R>`` and
    ``LOGS/err<R>``."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        out, err = f"{logs}/out{rank}", f"{logs}/err{rank}"
        proc = _CTX.Process(target=_rank, args=(list(argv), env, out, err, os.getcwd()))
        proc.start()
        procs.append(proc)
    return procs


def run_ranks(
    argv: list[str], nproc: int = 2, timeout: float = 600, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python ARGV`` on ``nproc`` local ranks forked after the imports, to the end. The result's
    ``returncode`` is the first failing rank's exit code (0 when all exited 0; as torchrun does,
    a failing rank ends the others; -9 when the launch ran past ``timeout``); ``stdout`` and
    ``stderr`` are the ranks' own, the other ranks' first and rank 0's last (so its final line is
    the output's last)."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        procs = start_ranks(argv, nproc, logs, extra_env)
        code = _wait_all(procs, timeout)
        order = [*range(1, nproc), 0]
        stdout = "".join(Path(f"{logs}/out{r}").read_text(errors="replace") for r in order)
        stderr = "".join(Path(f"{logs}/err{r}").read_text(errors="replace") for r in order)
    return subprocess.CompletedProcess(argv, code, stdout, stderr)


def _wait_all(procs: list, timeout: float) -> int:
    """Wait for every rank; on the first failure (or at the timeout) end the others, as torchrun
    does. Returns 0 when all exited 0, else the first failure's exit code."""
    deadline = time.monotonic() + timeout
    code = 0
    while any(p.is_alive() for p in procs):
        bad = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if bad:
            code = bad[0]
            break
        if time.monotonic() > deadline:
            code = -9
            break
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    if code == 0:
        code = next((p.exitcode for p in procs if p.exitcode != 0), 0)
    return code
