"""sglang-router in front of several SGLang servers (``rollout.sglang.router``).

The router (the ``sglang-router`` package, a Rust load balancer that SGLang ships; installed in
the SGLang venv by ``tools/sglang_env.sh``) is started by the driver as a child process, the same
way as a server (own process group, parent-death watchdog), with the workers' URLs. With the
default ``manual`` policy every request of a prompt carries the prompt's routing key
(``protocol.routing_key``), so a prompt's samples go to one worker and meet their cached prefix
there, and a new prompt goes to the least-loaded worker; the cache-aware policy sends each request
to the worker whose radix tree holds the longest prefix of it instead. ``/generate``
goes through it; weight loads and cache flushes go to every worker directly. When a worker is
restarted the router is told (``remove_worker`` then ``add_worker``) so that it drops the old
worker's state and routes to it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from hpt_megatron.rollout.sglang.server import (
    ServerLaunch,
    ServerStartError,
    SGLangServer,
    free_port,
)

if TYPE_CHECKING:
    from hpt_megatron.config.rollout import SGLangConfig
    from hpt_megatron.rollout.sglang.client import Endpoint

logger = logging.getLogger(__name__)

ROUTER_MODULE = "sglang_router.launch_router"


def router_installed(python: str) -> bool:
    """Whether ``python`` (the SGLang venv's) can import ``sglang_router``."""
    if not Path(python).exists():
        return False
    check = "import importlib.util as u, sys; sys.exit(u.find_spec('sglang_router') is None)"
    try:
        return subprocess.run([python, "-c", check], timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def use_router(cfg: SGLangConfig, num_workers: int) -> bool:
    """``rollout.sglang.router`` resolved: ``auto`` is on with two workers or more, when
    sglang-router is installed (otherwise the client balances, and says so)."""
    if cfg.router is False:
        return False
    if cfg.router is True:
        return True
    if num_workers < 2:
        return False
    if router_installed(cfg.python_executable()):
        return True
    logger.warning(
        "rollout.sglang.router=auto: sglang-router is not installed in %s (tools/sglang_env.sh "
        "installs it); balancing %d servers in the client instead",
        cfg.python_executable(),
        num_workers,
    )
    return False


def router_args(
    cfg: SGLangConfig, *, worker_urls: list[str], port: int, metrics_port: int
) -> list[str]:
    """Arguments of ``python -m sglang_router.launch_router`` for ``worker_urls``."""
    args = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls]
    args += ["--policy", cfg.router_policy]
    if cfg.router_policy == "manual":  # a new routing key goes to the least-loaded worker
        args += ["--assignment-mode", "min_load"]
    args += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    args += ["--log-level", "warn"]
    # Long generations: the router must not cut a request the client still waits for.
    args += ["--request-timeout-secs", str(int(cfg.request_timeout_s) + 60)]
    args += ["--worker-startup-timeout-secs", str(int(cfg.startup_timeout_s))]
    return args  # the workers' API key goes outside the command line (ServerLaunch.api_key)


def launch_router(
    cfg: SGLangConfig, *, worker_urls: list[str], log_dir: str | Path, api_key: str | None
) -> SGLangServer:
    """Start the router on a free loopback port (on the driver) and wait until it is healthy."""
    port = free_port("127.0.0.1")
    args = router_args(
        cfg,
        worker_urls=worker_urls,
        port=port,
        metrics_port=free_port("127.0.0.1"),
    )
    launch = ServerLaunch(
        python=cfg.python_executable(),
        args=args,
        host="127.0.0.1",
        port=port,
        log_path=Path(log_dir) / "sglang_router.log",
        api_key=api_key,
        startup_timeout_s=cfg.startup_timeout_s,
        module=ROUTER_MODULE,
    )
    router = SGLangServer(launch)
    router.start(wait=True)
    # /health answers before the workers are registered (that happens in the background).
    deadline = time.monotonic() + cfg.startup_timeout_s
    want = {u.rstrip("/") for u in worker_urls}
    while set(router_workers(router.url, router.auth_headers(), healthy_only=True) or []) != want:
        if time.monotonic() > deadline or not router.is_alive():
            router.stop()
            raise ServerStartError(
                f"sglang-router at {router.url} did not register the workers {sorted(want)}; "
                f"log {launch.log_path}:\n{router.log_tail()}"
            )
        time.sleep(0.5)
    logger.info("sglang-router at %s (%s) over %s", router.url, cfg.router_policy, worker_urls)
    return router


async def tell_router_restarted(
    session: aiohttp.ClientSession, router: Endpoint, worker_url: str, api_key: str | None
) -> None:
    """Make the router drop a restarted worker's state (``DELETE /workers/<id>``) and route to
    it again (``POST /workers``)."""
    headers = router.auth_headers()
    timeout = aiohttp.ClientTimeout(total=60)

    async def call(method: str, path: str, **kwargs: Any) -> Any:
        async with session.request(
            method, f"{router.url}{path}", headers=headers, timeout=timeout, **kwargs
        ) as response:
            if response.status >= 300:
                text = (await response.text())[:500]
                raise RuntimeError(f"sglang-router {method} {path}: {response.status} {text}")
            return await response.json(content_type=None)

    await tell_router_down(session, router, worker_url)
    body: dict[str, Any] = {"url": worker_url}
    if api_key:
        body["api_key"] = api_key
    await call("POST", "/workers", json=body)
    logger.info(
        "sglang-router %s: worker %s re-registered after its restart", router.url, worker_url
    )


async def tell_router_down(
    session: aiohttp.ClientSession, router: Endpoint, worker_url: str
) -> None:
    """Take a dead worker out of the router's rotation (``DELETE /workers/<id>``; the router
    removes it in the background: wait until it is no longer listed)."""
    headers = router.auth_headers()
    timeout = aiohttp.ClientTimeout(total=60)

    async def listed() -> list[dict[str, Any]]:
        async with session.get(f"{router.url}/workers", headers=headers, timeout=timeout) as r:
            body = await r.json(content_type=None)
        workers = body.get("workers", []) if isinstance(body, dict) else []
        return [w for w in workers if str(w.get("url", "")).rstrip("/") == worker_url]

    for worker in await listed():
        async with session.delete(
            f"{router.url}/workers/{worker['id']}", headers=headers, timeout=timeout
        ) as response:
            if response.status >= 300:
                text = (await response.text())[:500]
                raise RuntimeError(f"sglang-router DELETE /workers: {response.status} {text}")
    for _ in range(40):
        if not await listed():
            return
        await asyncio.sleep(0.25)


def router_workers(
    url: str, headers: dict[str, str], timeout_s: float = 10.0, healthy_only: bool = False
) -> list[str] | None:
    """The worker URLs of the sglang-router at ``url`` (``GET /workers``; only those it finds
    healthy with ``healthy_only``), or ``None`` when ``url`` is not a router (an SGLang server
    answers 404 there)."""
    request = urllib.request.Request(f"{url}/workers", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            listed = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if not isinstance(listed, dict) or not isinstance(listed.get("workers"), list):
        return None
    return [
        str(w["url"]).rstrip("/")
        for w in listed["workers"]
        if w.get("url") and (w.get("is_healthy", True) or not healthy_only)
    ]


def routing_counts(router: Endpoint, timeout_s: float = 5.0) -> dict[str, float]:
    """How the ``manual`` policy routed the keyed requests so far (the router's Prometheus
    metrics): ``rollout/router/new_prompts``, keys it gave a worker (the least-loaded: prompts
    seen for the first time), and ``rollout/router/same_worker``, requests it sent to the worker
    their key already had. Their sum is every keyed request when every prompt's requests stayed
    on one worker. Empty for a router not started here (its metrics port is unknown), with
    another policy, or when the router does not answer."""
    launch = getattr(router, "launch", None)
    args: list[str] = launch.args if isinstance(launch, ServerLaunch) else []
    if "--prometheus-port" not in args or args[args.index("--policy") + 1] != "manual":
        return {}
    port = args[args.index("--prometheus-port") + 1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return {}
    names = {"vacant": "rollout/router/new_prompts", "occupied_hit": "rollout/router/same_worker"}
    out = dict.fromkeys(names.values(), 0.0)
    for line in text.splitlines():
        if line.startswith("smg_manual_policy_branch_total{"):
            branch = line.split('branch="', 1)[1].split('"', 1)[0]
            if branch in names:
                out[names[branch]] += float(line.rsplit(" ", 1)[1])
    return out
