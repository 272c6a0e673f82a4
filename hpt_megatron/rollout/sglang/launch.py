"""Starting SGLang servers on this node: their addresses, API keys and launch arguments.

Both the driver's own launch (``SGLangEngine.launch``) and every node's launch over several
nodes (``nodes.start_node_servers``) start their servers here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import secrets
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hpt_megatron.config.rollout import SGLangConfig, sglang_server_args, sglang_server_env
from hpt_megatron.rollout.sglang.router import use_router
from hpt_megatron.rollout.sglang.server import ServerLaunch, SGLangServer, free_port


def launch_servers(
    cfg: SGLangConfig,
    *,
    model_path: str | Path,
    log_dir: str | Path,
    api_key: str | None,
    host: str = "127.0.0.1",
    name: str = "sglang_server",
) -> list[SGLangServer]:
    """Start ``cfg.servers_per_node`` servers on this node in parallel, bound to ``host``; all
    healthy, or none left running. Logs are ``<log_dir>/<name>_<i>.log``."""
    model_path = str(model_path)
    if not Path(model_path).is_dir():
        raise ValueError(f"rollout model path {model_path} is not a directory")
    servers = []
    for i in range(cfg.servers_per_node):
        port = cfg.base_port + i if cfg.base_port else free_port(host)
        args = sglang_server_args(cfg, model_path=model_path, port=port, server_index=i, host=host)
        launch = ServerLaunch(
            python=cfg.python_executable(),
            args=args,
            host=host,
            port=port,
            log_path=Path(log_dir) / f"{name}_{i}.log",
            env=sglang_server_env(cfg),
            api_key=api_key,
            startup_timeout_s=cfg.startup_timeout_s,
            movable_port=not cfg.base_port,
        )
        servers.append(SGLangServer(launch))
    try:
        for server in servers:
            server.start(wait=False)
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.wait_healthy(), servers))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def resolve_api_key(cfg: SGLangConfig) -> str | None:
    """The API key of ``cfg.api_key_env`` (``None`` when no variable is named)."""
    if not cfg.api_key_env:
        return None
    api_key = os.environ.get(cfg.api_key_env)
    if not api_key:
        raise ValueError(
            f"rollout.sglang.api_key_env: environment variable {cfg.api_key_env} is unset"
        )
    return api_key


def server_api_key(cfg: SGLangConfig, host: str, generated: str | None = None) -> str | None:
    """The key of servers we launch bound to ``host``: ``api_key_env``'s; else, for anything but
    loopback, ``generated`` (or a new one): such a server never runs without a key."""
    key = resolve_api_key(cfg)
    if key or is_loopback(host):
        return key
    return generated or secrets.token_urlsafe(32)


def with_router_metrics(cfg: SGLangConfig, num_servers: int) -> SGLangConfig:
    """Behind the router, each server's own ``/metrics`` is what counts its requests: servers
    launched for a routed engine get ``--enable-metrics``."""
    if use_router(cfg, num_servers) and "--enable-metrics" not in cfg.extra_args:
        return dataclasses.replace(cfg, extra_args=[*cfg.extra_args, "--enable-metrics"])
    return cfg


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_address() -> str:
    """What this node's hostname resolves to; when that is a loopback address (a Debian-style
    ``/etc/hosts``), the address of the interface that routes to ``MASTER_ADDR``."""
    with contextlib.suppress(OSError):
        address = socket.gethostbyname(socket.gethostname())
        if not is_loopback(address):
            return address
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
        return sock.getsockname()[0]


def bind_host(cfg: SGLangConfig, num_nodes: int) -> str:
    """The address this node's servers bind to (``rollout.sglang.host``, or the default)."""
    if cfg.host:
        return cfg.host
    return "127.0.0.1" if num_nodes == 1 else node_address()


def advertised_host(host: str) -> str:
    """The address others use for a server bound to ``host`` (a wildcard bind: the node's)."""
    return node_address() if host in ("0.0.0.0", "::", "") else host
