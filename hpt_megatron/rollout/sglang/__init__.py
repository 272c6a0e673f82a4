"""SGLang rollouts: server processes, the asynchronous client, weight sync, the engine."""

from hpt_megatron.rollout.sglang.engine import SGLangEngine, build_sglang_engine, launch_servers
from hpt_megatron.rollout.sglang.server import ServerStartError, SGLangServer, stop_all_servers

__all__ = [
    "SGLangEngine",
    "build_sglang_engine",
    "SGLangServer",
    "ServerStartError",
    "launch_servers",
    "stop_all_servers",
]
