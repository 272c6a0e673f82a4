"""A small tmpfs for the full-disk and read-only tests (``mount`` needs root; the test is
skipped otherwise)."""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
from collections.abc import Iterator

import pytest


def mount_tmpfs(path: pathlib.Path, size: str, *, read_only: bool = False) -> None:
    """Mount a tmpfs of ``size`` (``"1m"``) on ``path`` (created); skip the test when the
    machine does not allow it. The caller unmounts it (:func:`umount`)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)])
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def umount(path: pathlib.Path) -> None:
    subprocess.run(["umount", "-l", str(path)])


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str, *, read_only: bool = False) -> Iterator[pathlib.Path]:
    """:func:`mount_tmpfs` for the duration of the block."""
    mount_tmpfs(path, size, read_only=read_only)
    try:
        yield path
    finally:
        umount(path)


def fill(path: pathlib.Path, leave: int = 0) -> None:
    """Fill the filesystem of the folder ``path`` with one file, up to ``leave`` bytes free."""
    import shutil

    free = shutil.disk_usage(path).free - leave
    with open(path / "filler", "wb") as f, contextlib.suppress(OSError):
        while free > 0:
            chunk = min(free, 1 << 20)
            f.write(b"\0" * chunk)
            f.flush()
            free -= chunk
