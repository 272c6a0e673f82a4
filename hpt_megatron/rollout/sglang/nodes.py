"""SGLang servers on every node of a torchrun job.

Each node's local rank 0 starts that node's ``servers_per_node`` servers (node-local GPU ids),
bound to an address the driver can reach, and keeps them alive: a supervisor thread restarts a
server whose process exited (at most ``max_restarts`` times). The URLs are gathered on the
driver, whose engine treats every server as a :class:`NodeServer`: it sends the requests and the
weights, and when one goes down it waits for the server's own node to bring it back, then loads
the current weights into it. Servers die with the rank that started them (the launcher's parent
watchdog, ``server.py``), so Ctrl-C, SIGTERM or SIGKILL of any node's launch leaves none behind.

A one-node run keeps the driver's own launch (``SGLangEngine.launch``); this module is for
``torchrun --nnodes N`` with N > 1.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.sglang.launch import (
    advertised_host,
    bind_host,
    is_loopback,
    launch_servers,
    resolve_api_key,
    with_router_metrics,
)
from hpt_megatron.rollout.sglang.server import ExternalServer, ServerStartError, SGLangServer

logger = logging.getLogger(__name__)

SUPERVISE_EVERY_S = 1.0


@dataclass(frozen=True)
class NodeInfo:
    """This process's node in the torchrun job (torchrun's ``GROUP_RANK`` and sizes)."""

    node_rank: int
    num_nodes: int
    local_rank: int

    @property
    def is_leader(self) -> bool:
        """The node's local rank 0: it owns the node's servers."""
        return self.local_rank == 0

    @classmethod
    def from_env(cls) -> NodeInfo:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", str(max(1, world // max(1, local_world)))))
        return cls(
            node_rank=int(os.environ.get("GROUP_RANK", "0")),
            num_nodes=nodes,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


class NodeServer(ExternalServer):
    """The driver's handle on a server that node ``node_rank`` owns: requests and weights go to
    it; ``restart`` waits for that node's supervisor to bring it back."""

    def __init__(self, url: str, *, node_rank: int, api_key: str | None, timeout_s: float):
        super().__init__(url, api_key=api_key, timeout_s=timeout_s)
        self.node_rank = node_rank

    def restart(self, args: list[str] | None = None) -> None:
        try:
            super().restart(args)
        except ServerStartError as err:
            raise ServerStartError(
                f"SGLang server {self.url} of node {self.node_rank} was not restarted by its "
                f"node within {self.timeout_s:.0f} s (see that node's sglang_logs)"
            ) from err

    def log_tail(self, lines: int = 40) -> str:
        return f"(a server of node {self.node_rank}: its log is in that node's sglang_logs)"


class NodeServers:
    """A node's own servers and the thread that restarts those whose process exited."""

    def __init__(self, servers: list[SGLangServer], *, node_rank: int, max_restarts: int) -> None:
        self.servers = servers
        self.node_rank = node_rank
        self.max_restarts = max_restarts
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._supervise, daemon=True, name=f"sglang-node{node_rank}-supervisor"
        )
        self._thread.start()

    def _supervise(self) -> None:
        gave_up: set[int] = set()
        while not self._stop.wait(SUPERVISE_EVERY_S):
            for i, server in enumerate(self.servers):
                with self._lock:
                    if self._stop.is_set() or server.is_alive() or i in gave_up:
                        continue
                    if server.restarts >= self.max_restarts:
                        logger.error(
                            "node %d: sglang server %s exited; giving up after %d restarts",
                            self.node_rank,
                            server.url,
                            server.restarts,
                        )
                        gave_up.add(i)
                        continue
                    try:
                        server.restart()  # same port: the driver's URL stays valid
                    except ServerStartError as err:
                        logger.error("node %d: restart failed: %s", self.node_rank, err)

    def close(self) -> None:
        """Stop the supervisor, then every server (idempotent)."""
        self._stop.set()
        with self._lock:
            for server in self.servers:
                server.stop()
        self._thread.join(timeout=10)


@dataclass
class NodeServerGroup:
    """The outcome of :func:`start_node_servers` on one rank."""

    own: NodeServers | None  # this node's servers (its local rank 0 only)
    endpoints: list[NodeServer] | None  # every node's servers (the driver only)
    api_key: str | None  # the driver's copy (the client's and the router's)

    def close(self) -> None:
        if self.own is not None:
            self.own.close()


def start_node_servers(
    cfg: SGLangConfig,
    *,
    model_path: str | Path | None,
    run_dir: str | Path,
    group: dist.ProcessGroup | None,
    nodes: NodeInfo | None = None,
) -> NodeServerGroup:
    """Collective over all ranks: every node's local rank 0 starts its servers; the driver
    (rank 0) gets every URL. ``model_path`` (the driver's: a folder every node can read) is what
    they serve. Raises on every rank, naming the node, when any node cannot start its servers;
    no server is left running then.
    """
    nodes = nodes or NodeInfo.from_env()
    cfg = with_router_metrics(cfg, cfg.servers_per_node * nodes.num_nodes)
    facts = _driver_facts(cfg, model_path, run_dir, group)
    report: dict[str, Any] | None = None
    own: NodeServers | None = None
    if nodes.is_leader:
        report, own = _start_own(cfg, nodes, facts, run_dir)
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report, group=group)
    found = sorted((r for r in reports if r is not None), key=lambda r: r["node"])
    failed = [r for r in found if r["error"]]
    if failed:
        if own is not None:
            own.close()
        why = "\n".join(f"node {r['node']}: {r['error']}" for r in failed)
        raise ServerStartError(f"SGLang servers could not start on every node:\n{why}")
    if dist.get_rank() != 0:
        return NodeServerGroup(own, None, None)
    key = facts["key"] if any(r.get("keyed") for r in found) else None
    return NodeServerGroup(own, _driver_endpoints(cfg, found, key, run_dir), key)


def _driver_facts(
    cfg: SGLangConfig,
    model_path: str | Path | None,
    run_dir: str | Path,
    group: dist.ProcessGroup | None,
) -> dict[str, Any]:
    """Collective: the driver's facts on every rank: the model folder, a marker in the sync
    folder (every server must read the weights written there), and a per-run key for
    non-loopback servers. Never logged."""
    shared: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            sync_dir = cfg.sync_dir(run_dir)
            sync_dir.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(8)
            (sync_dir / f".node_check_{token}").write_text(token)
            key = resolve_api_key(cfg) if cfg.api_key_env else secrets.token_urlsafe(32)
            shared = [{"model_path": str(model_path), "token": token, "key": key}]
        except (OSError, ValueError) as err:  # told to every rank, not left for a hang
            shared = [{"error": f"node 0 (the driver): {err}"}]
    dist.broadcast_object_list(shared, src=0, group=group)
    facts = shared[0]
    if "error" in facts:
        raise ServerStartError(f"SGLang servers could not start on every node:\n{facts['error']}")
    return facts


def _start_own(
    cfg: SGLangConfig, nodes: NodeInfo, facts: dict[str, Any], run_dir: str | Path
) -> tuple[dict[str, Any], NodeServers | None]:
    """(a node's local rank 0) Start this node's servers: the report for the driver (their
    URLs and pids, or the error) and the supervised servers (``None`` if none started)."""
    report: dict[str, Any] = {"node": nodes.node_rank, "urls": [], "pids": [], "error": None}
    own: NodeServers | None = None
    try:
        host = bind_host(cfg, nodes.num_nodes)
        _check_reachable(host, nodes)
        _check_shared(Path(facts["model_path"]), cfg.sync_dir(run_dir), facts["token"])
        key = facts["key"] if (cfg.api_key_env or not is_loopback(host)) else None
        servers = launch_servers(
            cfg,
            model_path=facts["model_path"],
            log_dir=cfg.logs_dir(run_dir),
            api_key=key,
            host=host,
            name=f"node{nodes.node_rank}_server",
        )
        own = NodeServers(servers, node_rank=nodes.node_rank, max_restarts=cfg.max_restarts)
        public = advertised_host(host)
        report["urls"] = [f"http://{public}:{s.launch.port}" for s in servers]
        report["pids"] = [s.proc.pid if s.proc else None for s in servers]
        report["keyed"] = key is not None
    except (ServerStartError, OSError, ValueError) as err:
        report["error"] = str(err)  # the caller stops ``own`` once every node's report is in
    return report, own


def _driver_endpoints(
    cfg: SGLangConfig, found: list[dict[str, Any]], key: str | None, run_dir: str | Path
) -> list[NodeServer]:
    """(driver) Every node's servers as endpoints, listed in ``<log_dir>/servers.json``; the
    sync folder's node markers removed."""
    sync_dir, log_dir = cfg.sync_dir(run_dir), cfg.logs_dir(run_dir)
    if sync_dir.is_dir():
        for marker in sync_dir.glob(".node_check_*"):
            marker.unlink(missing_ok=True)
    endpoints = [
        NodeServer(url, node_rank=r["node"], api_key=key, timeout_s=cfg.startup_timeout_s)
        for r in found
        for url in r["urls"]
    ]
    listing = [
        {"node": r["node"], "url": url, "pid": pid}
        for r in found
        for url, pid in zip(r["urls"], r["pids"])
    ]
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "servers.json").write_text(json.dumps(listing, indent=1) + "\n")
    logger.info("SGLang servers on %d nodes: %s", len(found), [e.url for e in endpoints])
    return endpoints


def _check_reachable(host: str, nodes: NodeInfo) -> None:
    """A loopback bind on a node the driver does not share cannot be reached from it."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        master_ip = socket.gethostbyname(master)
    except OSError:
        master_ip = master
    if nodes.num_nodes > 1 and is_loopback(host) and not is_loopback(master_ip):
        raise ValueError(
            f"rollout.sglang.host: {host} is a loopback address, which the driver on "
            f"{master} cannot reach from another node; leave host unset (the node's address) "
            "or give one the driver can reach"
        )


def _check_shared(model_path: Path, sync_dir: Path, token: str) -> None:
    """The served model and the driver's weight folders must be readable on this node."""
    if not model_path.is_dir():
        raise ValueError(
            f"the model folder {model_path} the servers start from is not on this node: put "
            "model.hf_weights (or the run directory) on a file system every node mounts"
        )
    marker = sync_dir / f".node_check_{token}"
    if not marker.is_file() or marker.read_text() != token:
        raise ValueError(
            f"rollout.sglang.weight_sync_dir {sync_dir} is not the driver's folder on this node: "
            "the disk transport needs a folder every node reads (a shared file system)"
        )
