"""The SGLang test tier's shared set-up: the CPU server config and the SGLang environment check."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpt_megatron.config.rollout import SGLangConfig


def server_config(max_total_tokens: int = 16384, **overrides: object) -> SGLangConfig:
    """A float32 CPU server without warm-up; the KV cache bounded (it would otherwise take most of
    the host's RAM); generous timeouts (a CPU server's start-up can take minutes on a busy host)."""
    cfg = SGLangConfig(
        device="cpu",
        dtype="float32",
        max_total_tokens=max_total_tokens,
        extra_args=["--skip-server-warmup"],
        startup_timeout_s=600,
        request_timeout_s=300,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def require_sglang() -> str:
    """The SGLang venv's python; skips the test when tools/sglang_env.sh has not built it."""
    python = SGLangConfig(device="cpu").python_executable()
    if not Path(python).exists():
        pytest.skip(f"SGLang environment not found ({python}): run `bash tools/sglang_env.sh`")
    return python
