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


def sglang_servers_under(root_pid: int) -> list[int]:
    """PIDs of ``sglang.launch_server`` processes descending from ``root_pid`` (from /proc)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root_pid:
                return True
            pid = parents.get(pid, 0)
        return False

    return [p for p, cmd in commands.items() if b"sglang.launch_server" in cmd and descends(p)]
