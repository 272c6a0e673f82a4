"""``SGLangEngine``: the rollout-engine protocol on top of SGLang servers.

The engine owns the server processes, an asyncio event loop in a background thread (the client
and weight transports are asynchronous; the protocol is synchronous), and one weight transport.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hpt_megatron.config.rollout import (
    RolloutConfig,
    SGLangConfig,
    sglang_server_args,
    sglang_server_env,
)
from hpt_megatron.rollout.base import Generation, SamplingParams, WeightBucket
from hpt_megatron.rollout.sampling import validate_sampling
from hpt_megatron.rollout.sglang.client import ServerPool, SGLangClient
from hpt_megatron.rollout.sglang.server import ServerLaunch, SGLangServer, free_port
from hpt_megatron.rollout.sglang.weight_sync import WeightTransport
from hpt_megatron.rollout.sglang.weight_sync.disk import DiskTransport

if TYPE_CHECKING:
    from hpt_megatron.models.hf_config import HFModelConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")


class _LoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` blocks on a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="sglang")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def launch_servers(
    cfg: SGLangConfig, *, model_path: str | Path, log_dir: str | Path, api_key: str | None
) -> list[SGLangServer]:
    """Start ``cfg.num_servers`` servers in parallel; all healthy, or none left running."""
    model_path = str(model_path)
    if not Path(model_path).is_dir():
        raise ValueError(f"rollout model path {model_path} is not a directory")
    servers = []
    for i in range(cfg.num_servers):
        port = cfg.base_port + i if cfg.base_port else free_port(cfg.host)
        args = sglang_server_args(
            cfg, model_path=model_path, port=port, server_index=i, api_key=api_key
        )
        launch = ServerLaunch(
            python=cfg.python_executable(),
            args=args,
            host=cfg.host,
            port=port,
            log_path=Path(log_dir) / f"sglang_server_{i}.log",
            env=sglang_server_env(cfg),
            api_key=api_key,
            startup_timeout_s=cfg.startup_timeout_s,
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


class SGLangEngine:
    """Rollout engine backed by SGLang servers (implements ``RolloutEngine``).

    Build it with ``SGLangEngine.launch(cfg, model_path=..., run_dir=...)``; or wrap servers that
    are already running with the constructor.

    Args:
        servers: started, healthy servers.
        transport: the weight-sync transport (default: disk snapshots under the working dir).
        cfg: client settings (retries, timeouts, concurrency, seeds).
    """

    def __init__(
        self,
        servers: list[SGLangServer],
        *,
        transport: WeightTransport | None = None,
        cfg: SGLangConfig | None = None,
    ) -> None:
        cfg = cfg or SGLangConfig()
        self.cfg = cfg
        self.servers = servers
        self.transport = transport or DiskTransport(Path.cwd() / "rollout_weights")
        self.weight_version = 0
        self._loop = _LoopThread()
        self.pool = ServerPool(
            servers,
            max_concurrency=cfg.max_concurrency,
            max_restarts=cfg.max_restarts,
            on_restart=self._after_restart,
        )
        self.client = SGLangClient(
            self.pool,
            request_timeout_s=cfg.request_timeout_s,
            max_retries=cfg.max_retries,
            seeded_sampling=cfg.seeded_sampling or cfg.device == "cpu",
        )
        self._closed = False

    @classmethod
    def launch(
        cls,
        cfg: SGLangConfig,
        *,
        model_path: str | Path,
        run_dir: str | Path,
        transport: WeightTransport | None = None,
    ) -> SGLangEngine:
        """Start the configured servers on ``model_path``; logs and weights go under ``run_dir``."""
        api_key = None
        if cfg.api_key_env:
            api_key = os.environ.get(cfg.api_key_env)
            if not api_key:
                raise ValueError(
                    f"rollout.sglang.api_key_env: environment variable {cfg.api_key_env} is unset"
                )
        log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(run_dir) / "sglang_logs"
        servers = launch_servers(cfg, model_path=model_path, log_dir=log_dir, api_key=api_key)
        if transport is None:  # weight_sync is auto or disk: the config allows nothing else
            sync_dir = cfg.weight_sync_dir or Path(run_dir) / "rollout_weights"
            transport = DiskTransport(sync_dir)
        return cls(servers, transport=transport, cfg=cfg)

    # -- protocol -----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Return ``params.n`` generations per prompt, grouped by prompt in prompt order."""
        self._check_open()
        validate_sampling(params)
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: at least one token is needed")
        return self._loop.run(self.client.generate(prompts, params, self.weight_version))

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """Push HF-named full tensors to every server with the configured transport."""
        self._check_open()
        self._loop.run(self.transport.push(self.client, buckets, version))
        self.weight_version = version

    def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        """Load an HF safetensors folder into every server (any transport)."""
        self._check_open()
        disk = self.transport if isinstance(self.transport, DiskTransport) else DiskTransport(path)
        self._loop.run(disk.load(self.client, path, version))
        self.weight_version = version

    def flush_cache(self) -> None:
        self._loop.run(self.client.post_all("/flush_cache", {}))

    def release_memory(self) -> None:
        """Free the servers' GPU memory (weights and KV cache) while the trainer runs.

        Needs ``--enable-memory-saver`` in ``rollout.sglang.extra_args``; a no-op on CPU.
        """
        if self.cfg.device == "cpu":
            return
        self._loop.run(self.client.post_all("/release_memory_occupation", {}))

    def resume_memory(self) -> None:
        """Take the memory back: weights first, then the KV cache (peak memory stays lower)."""
        if self.cfg.device == "cpu":
            return
        for tags in (["weights"], ["kv_cache"]):
            self._loop.run(self.client.post_all("/resume_memory_occupation", {"tags": tags}))

    def health(self) -> bool:
        return not self._closed and all(server.health() for server in self.servers)

    @property
    def restarts(self) -> int:
        """Servers restarted after they died (the client re-sent their lost requests)."""
        return sum(server.restarts for server in self.servers)

    def shutdown(self) -> None:
        """Stop every server and the event loop (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self.client.close())
        finally:
            self._loop.close()
            for server in self.servers:
                server.stop()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    async def _after_restart(self, index: int) -> None:
        await self.transport.resync(self.client, index)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the SGLang rollout engine was shut down")


def build_sglang_engine(
    cfg: RolloutConfig,
    *,
    hf: HFModelConfig,
    tokenizer: Any,
    run_dir: str | Path,
    model_path: str | Path | None = None,
) -> SGLangEngine:
    """The scheduler's entry point for ``rollout.engine: sglang``.

    Serves ``model_path`` when given (an HF folder); otherwise writes a randomly initialised model
    of config ``hf`` plus ``tokenizer`` to ``<run_dir>/sglang_init_model`` and serves that, the
    trainer then overwriting the weights at step 0 (fine for small models; for large ones pass
    the checkpoint folder).
    """
    if model_path is None:
        model_path = Path(run_dir) / "sglang_init_model"
        if not (model_path / "config.json").is_file():
            _write_init_model(hf, tokenizer, model_path)
    return SGLangEngine.launch(cfg.sglang, model_path=model_path, run_dir=run_dir)


def _write_init_model(hf: HFModelConfig, tokenizer: Any, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(hf.to_transformers()).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
