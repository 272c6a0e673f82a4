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
