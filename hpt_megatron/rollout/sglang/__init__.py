"""SGLang rollouts: server processes, the asynchronous client, the engine."""

from hpt_megatron.rollout.sglang.build import build_sglang_engine
from hpt_megatron.rollout.sglang.engine import SGLangEngine
from hpt_megatron.rollout.sglang.launch import launch_servers
from hpt_megatron.rollout.sglang.server import ServerStartError, SGLangServer, stop_all_servers

__all__ = [
    "SGLangEngine",
    "build_sglang_engine",
    "SGLangServer",
    "ServerStartError",
    "launch_servers",
    "stop_all_servers",
]
