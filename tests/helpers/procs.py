"""Processes by command line, for tests that check no server outlived its run."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    """A free loopback TCP port below the kernel's ephemeral range.

    A port taken with ``bind(0)`` comes from the ephemeral range, where every outgoing connection
    (gloo's, HTTP clients') and every other ``bind(0)`` also draws its port: between the pick and
    the launcher's own bind, one of them can take it (a loaded run of the distributed tier failed
    with ``EADDRINUSE`` on a rank's store this way). Below that range only explicit binds land.
    """
    low = 20000
    try:
        top = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        top = 32768
    for _ in range(200):
        port = random.randrange(low, max(low + 1, top))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in [{low}, {top})")


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
