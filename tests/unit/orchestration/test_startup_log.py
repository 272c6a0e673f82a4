"""Third-party warnings in the ``hpt`` log: one line each, each first sentence once, rank 0 only
(the project's own on every rank)."""

import warnings

from hpt_megatron.cli import tidy_warnings

MEGATRON = "/site-packages/megatron/core/optimizer/__init__.py"


def _warn(text: str, filename: str) -> None:
    warnings.warn_explicit(text, UserWarning, filename, 24)


def test_third_party_warnings_once_on_one_line_rank_0_only(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        tidy_warnings("0")
        _warn("Transformer Engine and Apex are not installed. Falling back to Torch.", MEGATRON)
        _warn("Transformer Engine and Apex are not installed. Falling back to local.", "/m/a.py")
        _warn("Apex is not installed. Falling back to Torch Norm", MEGATRON)
    assert capsys.readouterr().err.splitlines() == [
        "WARNING UserWarning (optimizer/__init__.py): Transformer Engine and Apex are not "
        "installed. Falling back to Torch.",
        "WARNING UserWarning (optimizer/__init__.py): Apex is not installed. Falling back to "
        "Torch Norm",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        tidy_warnings("1")
        _warn("Apex is not installed. Falling back to Torch Norm", MEGATRON)
        _warn("our own warning", "/src/hpt_megatron/data/readers.py")
    assert capsys.readouterr().err == "WARNING UserWarning (data/readers.py): our own warning\n"
