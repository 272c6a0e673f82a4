"""Routing through sglang-router (``rollout.sglang.router_policy: manual``): the prompt's routing
key on every request of it, the router's arguments and its routing counts (no SGLang needed; the
real router is in tests/sglang/test_external_servers_router.py)."""

from __future__ import annotations

import http.server
import threading
from typing import Any

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.sglang.protocol import ROUTING_KEY_HEADER, routing_key
from hpt_megatron.rollout.sglang.router import router_args, routing_counts
from hpt_megatron.rollout.sglang.server import ServerLaunch


def test_the_routing_key_is_the_prompts() -> None:
    assert routing_key([1, 5, 6]) == routing_key([1, 5, 6])
    assert routing_key([1, 5, 6]) != routing_key([1, 5, 7])
    assert len(routing_key([1])) == 16


def test_manual_policy_gives_new_keys_to_the_least_loaded_worker() -> None:
    cfg = SGLangConfig(device="cpu")
    assert cfg.router_policy == "manual"
    args = router_args(cfg, worker_urls=["http://a:1"], port=2, metrics_port=3)
    assert args[args.index("--policy") + 1] == "manual"
    assert args[args.index("--assignment-mode") + 1] == "min_load"
    cfg.router_policy = "cache_aware"
    assert "--assignment-mode" not in router_args(
        cfg, worker_urls=["http://a:1"], port=2, metrics_port=3
    )


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


class _Router:
    def __init__(self, launch: ServerLaunch) -> None:
        self.launch = launch


def test_routing_counts_read_the_manual_policys_branches(tmp_path) -> None:  # noqa: ANN001
    _Metrics.body = (
        b"# TYPE smg_manual_policy_branch_total counter\n"
        b'smg_manual_policy_branch_total{branch="occupied_hit"} 12\n'
        b'smg_manual_policy_branch_total{branch="vacant"} 4\n'
        b'smg_worker_routing_keys_active{worker="http://127.0.0.1:1"} 0\n'
    )
    server = http.server.HTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = SGLangConfig(device="cpu")
        port = server.server_address[1]
        args = router_args(cfg, worker_urls=["http://a:1"], port=2, metrics_port=port)
        launch = ServerLaunch(
            python="python", args=args, host="127.0.0.1", port=2, log_path=tmp_path
        )
        assert routing_counts(_Router(launch)) == {  # type: ignore[arg-type]
            "rollout/router/new_prompts": 4.0,
            "rollout/router/same_worker": 12.0,
        }
        cfg.router_policy = "round_robin"
        args = router_args(cfg, worker_urls=["http://a:1"], port=2, metrics_port=port)
        launch.args = args
        assert routing_counts(_Router(launch)) == {}  # type: ignore[arg-type]
    finally:
        server.shutdown()
    assert ROUTING_KEY_HEADER == "x-smg-routing-key"
