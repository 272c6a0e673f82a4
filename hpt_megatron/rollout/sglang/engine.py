"""``SGLangEngine``: the rollout-engine protocol on top of SGLang servers.

The engine owns the server processes, an asyncio event loop in a background thread (the client
and weight transports are asynchronous; the protocol is synchronous), and one weight transport.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.base import Generation, SamplingParams, WeightBucket
from hpt_megatron.rollout.sampling import validate_sampling
from hpt_megatron.rollout.sglang.client import Endpoint, ServerPool, SGLangClient
from hpt_megatron.rollout.sglang.launch import (
    bind_host,
    launch_servers,
    resolve_api_key,
    server_api_key,
    with_router_metrics,
)
from hpt_megatron.rollout.sglang.partial import PartialSample, continue_samples, start_samples
from hpt_megatron.rollout.sglang.router import (
    launch_router,
    router_workers,
    routing_counts,
    tell_router_down,
    tell_router_restarted,
    use_router,
)
from hpt_megatron.rollout.sglang.scoring import score as score_tokens
from hpt_megatron.rollout.sglang.server import ExternalServer, ServerStartError
from hpt_megatron.rollout.weight_sync import WeightTransport
from hpt_megatron.rollout.weight_sync.disk import DiskTransport, check_loaded
from hpt_megatron.rollout.weight_sync.distributed import DistributedTransport, Target
from hpt_megatron.rollout.weight_sync.tensor import TensorTransport

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
        servers: Sequence[Endpoint],
        *,
        transport: WeightTransport | None = None,
        cfg: SGLangConfig | None = None,
        router: Endpoint | None = None,
        api_key: str | None = None,
    ) -> None:
        cfg = cfg or SGLangConfig()
        self.cfg = cfg
        self.servers = list(servers)
        self.router = router
        self._api_key = api_key  # the servers' (told to the router when a worker restarts)
        self.transport = transport or DiskTransport(Path.cwd() / "rollout_weights")
        self.weight_version = 0
        self.checked_tensors = 0  # per server, at the last load (rollout.sglang.check_weights)
        self.stale_resyncs = 0  # servers found serving their start weights, and brought back
        self._loop = _LoopThread()
        # Partial rollouts (rollout.partial): called before each round of requests, it loads
        # the weights queued by a push; ``interrupt`` aborts the requests in flight at a push.
        self.decode_hook: Callable[[], None] | None = None
        self._interrupted = threading.Event()
        self._abort_lock = threading.Lock()
        self._aborting: Future[None] | None = None
        self.pool = ServerPool(
            self.servers,
            max_concurrency=cfg.max_concurrency,
            max_restarts=cfg.max_restarts,
            on_restart=self._after_restart,
            on_down=self._after_down if router is not None else None,
        )
        self.client = SGLangClient(
            self.pool,
            request_timeout_s=cfg.request_timeout_s,
            max_retries=cfg.max_retries,
            seeded_sampling=cfg.seeded_sampling or cfg.device == "cpu",
            router=router,
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
        """Start the configured servers on ``model_path`` (and the router, when it is on); or,
        with ``cfg.urls``, connect to the user's servers. Logs and weights go under ``run_dir``."""
        if cfg.urls:
            return cls.connect(cfg, run_dir=run_dir, transport=transport)
        host = bind_host(cfg, 1)
        api_key = server_api_key(cfg, host)
        log_dir = cfg.logs_dir(run_dir)
        cfg = with_router_metrics(cfg, cfg.servers_per_node)
        servers = launch_servers(
            cfg, model_path=model_path, log_dir=log_dir, api_key=api_key, host=host
        )
        try:
            return cls.over(servers, cfg, run_dir=run_dir, api_key=api_key, transport=transport)
        except BaseException:
            for server in servers:
                server.stop()
            raise

    @classmethod
    def over(
        cls,
        servers: Sequence[Endpoint],
        cfg: SGLangConfig,
        *,
        run_dir: str | Path,
        api_key: str | None,
        transport: WeightTransport | None = None,
        router: Endpoint | None = None,
    ) -> SGLangEngine:
        """An engine over servers that are up (this node's, every node's, or the user's): in
        front of them ``router`` (the user's), or ours when it is on; the configured weight
        transport."""
        if router is None and use_router(cfg, len(servers)):
            router = launch_router(
                cfg,
                worker_urls=[s.url for s in servers],
                log_dir=cfg.logs_dir(run_dir),
                api_key=api_key,
            )
        transport = transport or _transport(cfg, run_dir)
        return cls(servers, transport=transport, cfg=cfg, router=router, api_key=api_key)

    @classmethod
    def connect(
        cls,
        cfg: SGLangConfig,
        *,
        run_dir: str | Path,
        transport: WeightTransport | None = None,
        key: str = "rollout.sglang.urls",
    ) -> SGLangEngine:
        """Use the servers of ``cfg.urls``, started by the user: each must answer ``/health``
        now (``ServerStartError`` naming the URL otherwise); they are never started or stopped
        from here. A single URL may be the user's sglang-router: generation then goes through
        it and weights to each of its workers. A router we start (``cfg.router``) is ours."""
        api_key = resolve_api_key(cfg)
        timeout = cfg.startup_timeout_s
        given = [
            ExternalServer(url, api_key=api_key, timeout_s=timeout, key=key) for url in cfg.urls
        ]
        with ThreadPoolExecutor(len(given)) as pool:
            list(pool.map(lambda s: s.check(), given))
        router: Endpoint | None = None
        servers = given
        workers = router_workers(given[0].url, given[0].auth_headers()) if len(given) == 1 else None
        if workers is not None:  # the one URL is a router: its workers get the weights
            if not workers:
                raise ServerStartError(f"{key}: the router {given[0].url} has no workers")
            router = given[0]
            servers = [
                ExternalServer(url, api_key=api_key, timeout_s=timeout, key=key) for url in workers
            ]
            for server in servers:
                server.check()
            logger.info("using the sglang-router at %s over %s", router.url, workers)
        logger.info("using %d external SGLang servers: %s", len(servers), [s.url for s in servers])
        return cls.over(
            servers, cfg, run_dir=run_dir, api_key=api_key, transport=transport, router=router
        )

    # -- protocol -----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Return ``params.n`` generations per prompt, grouped by prompt in prompt order."""
        self._check_open()
        validate_sampling(params)
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: at least one token is needed")
        if self.decode_hook is not None:
            return self._generate_partial(prompts, params)
        if self.weight_version:
            self._loop.run(self._resync_restarted())
        return self._loop.run(self.client.generate(prompts, params, self.weight_version))

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of each response token after its prompt (``scoring.py``):
        the servers as a distillation teacher."""
        self._check_open()
        return self._loop.run(score_tokens(self.client, prompts, responses))

    def interrupt(self) -> None:
        """A weight push is queued (partial rollouts; called from the trainer's thread): abort
        the requests in flight, which ``generate`` continues once the push is loaded."""
        if self._closed:
            return
        with self._abort_lock:
            self._interrupted.set()
            self._aborting = asyncio.run_coroutine_threadsafe(
                self.client.abort_all(), self._loop.loop
            )

    def _generate_partial(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> list[Generation]:
        """``generate`` with partial rollouts: before each round the queued weights are loaded
        (``decode_hook``); the samples a push aborted (``interrupt``) are sent again as prompt
        + partial response, until every one has finished."""
        assert self.decode_hook is not None
        samples: list[PartialSample] = []
        todo: list[PartialSample] = []
        while True:
            self._settle_abort()
            self.decode_hook()
            if self.weight_version:
                self._loop.run(self._resync_restarted())
            if not samples:
                gens = self._loop.run(self.client.generate(prompts, params, self.weight_version))
                samples = start_samples(prompts, gens, params.n)
            else:
                gens = self._loop.run(
                    continue_samples(self.client, todo, params, self.weight_version)
                )
                for sample, gen in zip(todo, gens):
                    sample.extend(gen)
            todo = [s for s in samples if s.continues(params.max_new_tokens)]
            if not todo or not self._interrupted.is_set():
                break  # (an abort that was not ours ends the sample as aborted)
        return [s.generation(params.max_new_tokens) for s in samples]

    def _settle_abort(self) -> None:
        """Wait for the abort sent at the last push to have reached the servers (so that it
        cannot hit the next round's requests), and clear it."""
        with self._abort_lock:
            aborting, self._aborting = self._aborting, None
            self._interrupted.clear()
        if aborting is not None:
            aborting.result()

    def record_routing(self, top_k: int) -> None:
        """Return each generation's routed experts (``Generation.routed_experts``, ``top_k`` per
        token and MoE layer); the servers must run with ``--enable-return-routed-experts``."""
        self.client.routed_top_k = top_k

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """Push HF-named full tensors to every server with the configured transport."""
        self._check_open()
        self._loop.run(self.transport.push(self.client, buckets, version))
        self.weight_version = version
        latest = getattr(self.transport, "latest", None)
        if self.cfg.check_weights and latest is not None:
            self.checked_tensors = self._loop.run(check_loaded(self.client, latest))

    def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        """Load an HF safetensors folder into every server (any transport)."""
        self._check_open()
        disk = self.transport if isinstance(self.transport, DiskTransport) else DiskTransport(path)
        self._loop.run(disk.load(self.client, path, version))
        self.weight_version = version
        if self.cfg.check_weights:
            self.checked_tensors = self._loop.run(check_loaded(self.client, path))

    def admin(self, call: Callable[[SGLangClient], Coroutine[Any, Any, T]]) -> T:
        """Run ``call(client)`` on the engine's event loop (a weight pusher's server calls)."""
        self._check_open()
        return self._loop.run(call(self.client))

    def weights_loaded(self, version: int, targets: list[Target], checked: int) -> None:
        """A pusher that reaches the servers itself (``weight_sync: distributed``) loaded
        ``version`` into ``targets`` (``checked``: tensors read back from each server)."""
        self.weight_version = version
        if self.cfg.check_weights:
            self.checked_tensors = checked
        assert isinstance(self.transport, DistributedTransport)
        for index in self.transport.loaded(self.client):
            logger.info("sglang server %s resynced to version %d", self.servers[index].url, version)
            if self.router is not None:
                self._loop.run(self._tell_router_restarted(index))

    async def _resync_restarted(self) -> None:
        """A server that restarted unseen (between two steps: its node, or the user, brought it
        back) serves the weights it started from, and says so: its ``weight_version`` is not
        one we loaded. Load the current weights into it before it generates."""
        for i, server in enumerate(self.servers):
            if self.pool.state[i] != "up" or i in self.pool.held:
                continue  # (a held server waits for the next push)
            try:
                info = await self.client.get(i, "/model_info")
            except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError):
                continue  # a dead server: the request path restarts it
            version = str(info.get("weight_version", "")) if isinstance(info, dict) else ""
            if version.isdigit():
                continue
            logger.warning(
                "sglang server %s serves weight version %r, not %d (restarted unseen): loading "
                "the current weights",
                server.url,
                version,
                self.weight_version,
            )
            self.stale_resyncs += 1
            await self._after_restart(i)

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
        """Servers restarted after they died (the client re-sent their lost requests), and those
        found restarted unseen and brought to the current weights."""
        return sum(server.restarts for server in self.servers) + self.stale_resyncs

    def server_metrics(self) -> dict[str, float]:
        """Per-server ``/generate`` requests and prefix-cache hits so far, as metrics (and, with
        ``check_weights``, the tensors read back from each server at the last load).

        Through the router the client cannot see which worker answered: each worker's count is
        then its own ``/metrics`` (present when it runs with ``--enable-metrics``, which servers
        launched behind the router get); and, with the ``manual`` policy, how the router kept
        each prompt's requests on one worker (``router.routing_counts``).
        """
        out: dict[str, float] = {}
        if self.cfg.check_weights:
            out["rollout/checked_tensors"] = float(self.checked_tensors)
        pool = self.pool
        if self.router is None:
            for i in range(len(self.servers)):
                out[f"rollout/requests/server_{i}"] = float(pool.requests[i])
            out["rollout/cached_prompt_tokens"] = float(sum(pool.cached_tokens))
            return out
        out["rollout/requests/router"] = float(self.client.routed_requests)
        out.update(routing_counts(self.router))
        out["rollout/cached_prompt_tokens"] = float(self.client.routed_cached_tokens)
        for i, server in enumerate(self.servers):
            counters = server_counters(server)
            if counters is not None:
                out[f"rollout/requests/server_{i}"] = counters[0]
        return out

    def shutdown(self) -> None:
        """Stop every server we started, the router and the event loop (idempotent); servers
        of ``rollout.sglang.urls`` keep running."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self.transport.close(self.client))
        except Exception as err:  # the servers are stopped below whatever happened here
            logger.warning("closing the weight transport: %r", err)
        try:
            self._loop.run(self.client.close())
        finally:
            self._loop.close()
            if self.router is not None:
                self.router.stop()
            for server in self.servers:
                server.stop()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    async def _after_down(self, index: int) -> None:
        if self.router is not None and self.router.is_alive():
            await tell_router_down(self.client.session(), self.router, self.servers[index].url)

    async def _after_restart(self, index: int) -> None:
        # Until no newer version was loaded into the others meanwhile (those loads skip a
        # server being restarted), bring it to the newest one.
        while True:
            latest = getattr(self.transport, "latest", None)
            await self.transport.resync(self.client, index)
            if self.cfg.check_weights and latest is not None:
                await check_loaded(self.client, latest, index)
            if getattr(self.transport, "latest", None) == latest:
                break
        if self.router is not None and index not in self.pool.held:
            await self._tell_router_restarted(index)

    async def _tell_router_restarted(self, index: int) -> None:
        assert self.router is not None
        await tell_router_restarted(
            self.client.session(), self.router, self.servers[index].url, self._api_key
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the SGLang rollout engine was shut down")


def server_counters(server: Endpoint, timeout_s: float = 5.0) -> tuple[float, float] | None:
    """(``/generate`` requests answered, prompt tokens found in the prefix cache) of a server,
    from its Prometheus ``/metrics``; ``None`` when it exports none (no ``--enable-metrics``)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{server.url}/metrics", headers=server.auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return None
    requests = cached = 0.0
    seen = False
    for line in text.splitlines():
        if line.startswith("sglang:http_requests_total{") and 'endpoint="/generate"' in line:
            requests += float(line.rsplit(" ", 1)[1])
            seen = True
        elif line.startswith("sglang:cached_tokens_total"):
            cached += float(line.rsplit(" ", 1)[1])
    return (requests, cached) if seen or "sglang:" in text else None


def _transport(cfg: SGLangConfig, run_dir: str | Path) -> WeightTransport:
    """The configured transport (``auto`` is decided by the rollout plan, which hands its
    choice in; here, without one, it is disk)."""
    if cfg.weight_sync == "distributed":
        backend = "gloo" if cfg.device == "cpu" else "nccl"
        return DistributedTransport(backend, cfg.weight_sync_timeout_s, cfg.tp_size)
    if cfg.weight_sync == "tensor":
        return TensorTransport(cfg.weight_sync_timeout_s, cfg.tp_size)
    return DiskTransport(cfg.sync_dir(run_dir))
