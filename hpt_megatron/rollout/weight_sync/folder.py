"""Versioned weight folders: ``<root>/v<N>`` is written as ``<root>/v<N>.tmp`` and renamed when
complete, so a reader (an SGLang server, a restarted one) never sees a partial version."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The ``torch_dtype`` a config.json records for parameters of ``dtype``."""
    return DTYPE_NAMES[dtype]


class VersionFolder:
    """The folder of weight ``version`` under ``root``: :meth:`open` the temporary one, fill it,
    then :meth:`publish` it (or :meth:`discard` it after a failure)."""

    def __init__(self, root: Path, version: int) -> None:
        self.final = root / f"v{version}"
        self.tmp = root / f"v{version}.tmp"

    def open(self) -> Path:
        """An empty ``v<N>.tmp`` (a crashed writer's partial one is removed first)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def publish(self) -> Path:
        """Rename the filled ``v<N>.tmp`` to ``v<N>`` (replacing a version written again, as a
        resumed run does) and return it."""
        shutil.rmtree(self.final, ignore_errors=True)
        self.tmp.rename(self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_version(root: Path, version: int, fill: Callable[[Path], None]) -> Path:
    """One process's version folder: ``fill`` writes into ``v<N>.tmp``, which becomes ``v<N>``;
    when ``fill`` raises, its partial folder is removed."""
    folder = VersionFolder(root, version)
    tmp = folder.open()
    try:
        fill(tmp)
    except BaseException:
        folder.discard()
        raise
    return folder.publish()
