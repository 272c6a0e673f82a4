"""Fixtures of the SGLang test tier."""

from __future__ import annotations

import pytest

from tests.helpers.sglang_cpu import require_sglang


@pytest.fixture(scope="module")
def sglang_python() -> str:
    """The SGLang venv's python (the test is skipped without tools/sglang_env.sh's venv)."""
    return require_sglang()
