"""A run's files that cannot be written: a full disk, a read-only or missing folder.

Every place that writes the run's files (the run directory and its ``config.yaml`` and
tokenizer, metrics, TensorBoard, recorded rollouts, the weight-sync folder, the HF export) turns
the ``OSError`` into one :class:`WriteError` through :func:`writing`: the path, the reason and
what the disk has left, without a traceback (``orchestration/exits.py``). Checkpoints report the
same through ``CheckpointError`` (``trainer/checkpoint_write.py``), with :func:`space_note`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FULL_BELOW = 16 * 1024**2  # a disk with less free space is reported as full


class WriteError(RuntimeError):
    """A file of the run could not be written; the message names it, why, and the space left."""


def space_note(path: str | Path) -> str:
    """What the filesystem of ``path`` (or of its nearest existing parent) has left, the likely
    cause of a failed write (torch's zip writer reports a full disk as an ``unexpected pos``
    error, not as ENOSPC)."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return ""
    if free < FULL_BELOW:
        return f"; the disk is full (no space left on device: {free} bytes free)"
    return f"; {free / 1024**2:.0f} MiB free on that disk"


@contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
    """Turn an ``OSError`` inside into a :class:`WriteError` naming ``what`` and ``path``."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise WriteError(f"cannot write the {what} to {path}: {reason}{space_note(path)}") from err
