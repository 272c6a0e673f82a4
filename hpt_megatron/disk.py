"""A run's files that cannot be written: a full disk, a read-only or missing folder.

Every place that writes the run's files (the run directory and its ``config.yaml`` and
tokenizer, metrics, TensorBoard, recorded rollouts, the weight-sync folder, the HF export) turns
the ``OSError`` into one :class:`WriteError` through :func:`writing`: the path, the reason and
what the disk has left, without a traceback (``orchestration/exits.py``). Checkpoints report the
same through ``CheckpointError`` (``trainer/checkpoint_write.py``), with :func:`space_note`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FULL_BELOW = 16 * 1024**2  # a disk with less free space is reported as full
NOT_SPACE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR)


class WriteError(OSError):
    """A file of the run could not be written; the message names it, why, and the space left."""


def space_note(path: str | Path, *, may_be_full: bool = True) -> str:
    """What the filesystem of ``path`` (or of its nearest existing parent) has left, the likely
    cause of a failed write (torch's zip writer reports a full disk as an ``unexpected pos``
    error, not as ENOSPC); with ``may_be_full=False`` (the error was another, such as a
    read-only disk) only the free space."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return ""
    if may_be_full and free < FULL_BELOW:
        return f"; the disk is full (no space left on device: {free} bytes free)"
    return f"; {free / 1024**2:.0f} MiB free on that disk"


@contextmanager
def writing(path: str | Path, what: str, *, partial: str | Path | None = None) -> Iterator[None]:
    """Turn an ``OSError`` inside into a :class:`WriteError` naming ``what`` and ``path``;
    ``partial`` (a file or folder the block was writing) is removed first."""
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        removed = ""
        if partial is not None and remove(Path(partial)):
            removed = f"; the partial {Path(partial).name} was removed"
        reason = err.strerror or str(err) or type(err).__name__
        note = space_note(path, may_be_full=err.errno not in NOT_SPACE)
        raise WriteError(f"cannot write the {what} to {path}: {reason}{note}{removed}") from err


def replace_text(path: Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` through ``<path>.tmp`` and a rename: the file is whole, new or
    as it was. A failure is a :class:`WriteError`, the partial ``.tmp`` removed."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, what, partial=tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def remove(path: Path) -> bool:
    """Remove the file or folder ``path``, as far as possible; whether it was there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return True
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True
