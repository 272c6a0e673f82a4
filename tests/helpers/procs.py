"""Processes by command line, for tests that check no server outlived its run."""

from __future__ import annotations

from pathlib import Path


def pids_with(*needles: bytes) -> list[int]:
    """PIDs of the live processes whose command line contains every one of ``needles``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if all(n in cmd for n in needles):
                pids.append(int(entry.name))
    return pids


def kill_tree(pid: int, timeout: float = 60.0) -> None:
    """SIGKILL ``pid`` and every process under it, and wait until they are gone.

    Killing a torchrun launcher's process group is not enough: torchrun starts each rank in a
    session of its own, so the ranks outlive their launcher and go on writing the run's folder
    (a resumed run in the same folder then collided with them)."""
    import contextlib

    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root]
    with contextlib.suppress(psutil.NoSuchProcess):
        procs += root.children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"still alive after SIGKILL: {alive}"
