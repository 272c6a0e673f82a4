"""Worker of tests/distributed/test_node_servers.py: one rank per "node" (``torchrun --nnodes 2``),
each node's rank starting its (fake) SGLang server through ``start_node_servers``.

``python node_servers.py MODE OUT``: MODE ``serve`` runs generation over both nodes' servers,
has node 1 lose its server (killed; its supervisor restarts it) and checks the driver brings it
to the current weights; MODE ``fail`` gives node 1 an SGLang python that does not exist. Each
rank writes ``OUT/rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.sglang.engine import SGLangEngine
from hpt_megatron.rollout.sglang.nodes import NodeInfo, ServerStartError, start_node_servers

FAKE = Path(__file__).resolve().parents[2] / "unit" / "rollout" / "fake_sglang"


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, nodes = dist.get_rank(), NodeInfo.from_env()
    model = out / "model"
    if rank == 0:
        model.mkdir(parents=True, exist_ok=True)
        (model / "config.json").write_text("{}")
    python = sys.executable
    if mode == "fail" and nodes.node_rank == 1:
        python = str(out / "no-such-python")
    cfg = SGLangConfig(
        python=python,
        device="cpu",
        env={"PYTHONPATH": str(FAKE)},
        host="127.0.0.1",
        startup_timeout_s=30,
        request_timeout_s=30,
        max_restarts=1,
        api_key_env="HPT_NODE_KEY",
    )
    result: dict = {"rank": rank, "node": nodes.node_rank, "num_nodes": nodes.num_nodes}
    try:
        group = start_node_servers(
            cfg, model_path=model if rank == 0 else None, run_dir=out, group=None
        )
    except ServerStartError as err:
        result["error"] = str(err)
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
        return
    own = group.own
    assert own is not None
    result["own_pids"] = [s.proc.pid for s in own.servers]
    if rank == 0:
        engine = SGLangEngine.over(group.endpoints, cfg, run_dir=out, api_key=group.api_key)
        result["urls"] = [s.url for s in engine.servers]
        weights = out / "weights_v1"
        weights.mkdir()
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(weights / "model.safetensors"))
        engine.update_weights_from_disk(weights, 1)
        params = SamplingParams(n=2, max_new_tokens=3)
        engine.generate([[1, 2], [3, 4], [5, 6], [7, 8]], params)
        result["requests_before"] = engine.server_metrics()
    dist.barrier()
    if nodes.node_rank == 1:  # node 1 loses its server; its own supervisor brings it back
        server = own.servers[0]
        os.killpg(server.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (server.restarts == 1 and server.health()):
            assert time.monotonic() < deadline, "node 1 did not restart its server"
            time.sleep(0.2)
        result["restarted_pid"] = server.proc.pid
    dist.barrier()
    if rank == 0:
        engine.generate([[9, 9]], SamplingParams(n=1, max_new_tokens=2))
        result["stale_resyncs"] = engine.stale_resyncs
        result["versions"] = [
            engine._loop.run(engine.client.get(i, "/model_info"))["weight_version"]
            for i in range(len(engine.servers))
        ]
        engine.shutdown()  # the driver stops no other node's server
    dist.barrier()
    result["own_alive_after_driver_shutdown"] = [s.is_alive() for s in own.servers]
    group.close()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
