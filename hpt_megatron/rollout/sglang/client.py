"""Asynchronous client for a pool of SGLang servers: balancing, retries, crash recovery.

Requests carry ``input_ids`` (never text: SGLang's tokenisation can differ from the trainer's).
One ``/generate`` request per prompt holds its ``n`` samples, so the server shares the prompt's
KV cache. Requests go to the up server with the fewest in flight (bounded per server); a failed
request is retried on another server, and a server found dead is restarted in the background
(at most ``max_restarts`` times) while its lost requests are re-sent elsewhere or after it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import aiohttp

from hpt_megatron.rollout.base import Generation, SamplingParams
from hpt_megatron.rollout.seeds import derive_seed
from hpt_megatron.rollout.sglang.protocol import (
    ROUTING_KEY_HEADER,
    cached_tokens,
    parse_generation,
    routing_key,
    sampling_payload,
)
from hpt_megatron.rollout.sglang.server import ServerStartError

logger = logging.getLogger(__name__)

OnRestart = Callable[[int], Awaitable[None]]  # called with the server index once it is back


class Endpoint(Protocol):
    """What the client needs of a server or router: ``SGLangServer`` or ``ExternalServer``."""

    @property
    def url(self) -> str: ...

    @property
    def restarts(self) -> int: ...

    def auth_headers(self) -> dict[str, str]: ...

    def is_alive(self) -> bool: ...

    def health(self, timeout_s: float = 5.0) -> bool: ...

    def stop(self, grace_s: float = 10.0) -> None: ...

    def restart(self, args: list[str] | None = None) -> None: ...

    def log_tail(self, lines: int = 40) -> str: ...


class ServerPool:
    """The servers, their state (``up`` / ``restarting`` / ``failed``) and in-flight counts."""

    def __init__(
        self,
        servers: Sequence[Endpoint],
        *,
        max_concurrency: int,
        max_restarts: int,
        on_restart: OnRestart | None = None,
        on_down: OnRestart | None = None,
    ) -> None:
        self.servers = servers
        self.state = ["up"] * len(servers)
        # Up, but serving weights older than the run's: restarted while the weights could not
        # be brought to them (``weight_sync: distributed``); the next push resyncs them.
        self.held: set[int] = set()
        self.inflight = [0] * len(servers)
        # Answered ``/generate`` requests and the prompt tokens they found in the prefix cache,
        # per server (requests that went through a router are counted on the router's side).
        self.requests = [0] * len(servers)
        self.cached_tokens = [0] * len(servers)
        self.max_concurrency = max_concurrency
        self.max_restarts = max_restarts
        self.on_restart = on_restart
        self.on_down = on_down  # called with the index of a server found dead (being restarted)
        self._changed: asyncio.Condition | None = None
        self._restart_tasks: dict[int, asyncio.Task[None]] = {}
        self.restart_errors: dict[int, str] = {}  # each server's last failed restart, first line

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created lazily, inside the running loop
            self._changed = asyncio.Condition()
        return self._changed

    async def acquire(self) -> int:
        """Wait for an up server with spare capacity; return its index (call ``release`` after)."""
        async with self._cond():
            while True:
                self._raise_if_none_can_serve()
                ready = [
                    i
                    for i, s in enumerate(self.state)
                    if s == "up" and i not in self.held and self.inflight[i] < self.max_concurrency
                ]
                if ready:
                    index = min(ready, key=lambda i: self.inflight[i])
                    self.inflight[index] += 1
                    return index
                await self._cond().wait()

    async def wait_any_up(self) -> None:
        """Wait until at least one server is up (raise when every one has failed)."""
        async with self._cond():
            while not any(s == "up" and i not in self.held for i, s in enumerate(self.state)):
                self._raise_if_none_can_serve()
                await self._cond().wait()

    def _raise_if_none_can_serve(self) -> None:
        """Every server failed, or every live one waits for the next weight push."""
        if all(s == "failed" for s in self.state):
            raise RuntimeError(self._all_failed_message())
        if all(s == "failed" or i in self.held for i, s in enumerate(self.state)):
            held = [self.servers[i].url for i in sorted(self.held)]
            raise RuntimeError(
                f"every live SGLang server ({held}) restarted and waits for the next weight "
                "push (weight_sync: distributed cannot resync between pushes; disk can)"
            )

    async def release(self, index: int) -> None:
        async with self._cond():
            self.inflight[index] -= 1
            self._cond().notify_all()

    async def report_failure(self, index: int, grace_s: float = 0.0) -> bool:
        """After a failed request: restart the server in the background if its process died.
        Returns whether it is down (being restarted, or failed).

        ``grace_s``: how long a server still seen alive is asked again. A killed process
        closes its sockets a moment before it can be reaped, so a caller that must decide at
        once on a dropped connection (a weight load) gives it a few seconds.
        """
        if self.state[index] != "up":
            return True
        deadline = time.monotonic() + grace_s
        # (an external server's liveness is an HTTP health check: off the event loop)
        while await asyncio.to_thread(self.servers[index].is_alive):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
        if self.state[index] != "up":
            return True
        async with self._cond():
            self.state[index] = "restarting"
        self._restart_tasks[index] = asyncio.ensure_future(self._restart(index))
        if self.on_down is not None:
            try:
                await self.on_down(index)
            except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as err:
                logger.warning("after sglang server %s went down: %r", self.servers[index].url, err)
        return True

    async def _restart(self, index: int) -> None:
        server = self.servers[index]
        new_state = "failed"
        while server.restarts < self.max_restarts:
            try:
                await asyncio.to_thread(server.restart)
                if self.on_restart is not None:
                    await self.on_restart(index)
                new_state = "up"
                break
            except (ServerStartError, RuntimeError, aiohttp.ClientError) as err:
                logger.error("restart of sglang server %s failed: %s", server.url, err)
                self.restart_errors[index] = str(err).split("\n", 1)[0]
        if new_state == "failed":
            logger.error(
                "sglang server %s: giving up after %d restarts", server.url, server.restarts
            )
        async with self._cond():
            self.state[index] = new_state
            self._cond().notify_all()

    def _all_failed_message(self) -> str:
        tails = "\n".join(
            f"--- {s.url}: {self.restart_errors.get(i, 'no restart attempted')}\n{s.log_tail(15)}"
            for i, s in enumerate(self.servers)
        )
        return f"every SGLang server failed (restarts exhausted); last log lines:\n{tails}"


class SGLangClient:
    """HTTP calls to the pool; use from one asyncio event loop.

    Args:
        pool: the servers.
        request_timeout_s: whole-request timeout for ``/generate``.
        max_retries: further attempts of a failed request (on any server).
        seeded_sampling: send a per-sample ``sampling_seed`` when ``params.seed`` is set.
        router: an sglang-router in front of the pool's servers: ``/generate`` goes through it
            (its cache-aware policy keeps a prompt's samples where its prefix is cached); admin
            calls (weights, caches) still go to every server directly.
    """

    def __init__(
        self,
        pool: ServerPool,
        *,
        request_timeout_s: float = 1800.0,
        max_retries: int = 3,
        seeded_sampling: bool = False,
        router: Endpoint | None = None,
    ) -> None:
        self.pool = pool
        self.router = router
        self.routed_requests = 0  # /generate requests answered through the router
        self.routed_cached_tokens = 0
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.seeded_sampling = seeded_sampling
        # Experts per token of an MoE model whose routing the servers report (routing replay;
        # the servers run with --enable-return-routed-experts). None: not asked for.
        self.routed_top_k: int | None = None
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), trust_env=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def generate(
        self, prompts: list[list[int]], params: SamplingParams, weight_version: int
    ) -> list[Generation]:
        """``params.n`` generations per prompt, grouped by prompt in prompt order."""
        sampling = sampling_payload(params)
        if self.router is not None:
            # The router fails over to other workers by itself, so a dead worker may never fail
            # one of our requests: look for dead workers before each batch.
            for index in range(len(self.pool.servers)):
                await self.pool.report_failure(index)
        results = await asyncio.gather(
            *(self._generate_one(i, p, params, sampling) for i, p in enumerate(prompts))
        )
        return [
            parse_generation(
                item, i, weight_version, prompt=prompts[i], routed_top_k=self.routed_top_k
            )
            for i, items in enumerate(results)
            for item in items
        ]

    async def _generate_one(
        self, index: int, prompt: list[int], params: SamplingParams, sampling: dict[str, Any]
    ) -> list[dict[str, Any]]:
        n = params.n
        asks = self.asks()
        per_sample: dict[str, Any] | list[dict[str, Any]] = sampling
        if self.seeded_sampling and params.seed is not None:
            seed = params.seed
            per_sample = [
                {**sampling, "sampling_seed": derive_seed(seed, "sample", rank=index * n + j)}
                for j in range(n)
            ]
        if self.router is not None and isinstance(per_sample, list) and n > 1:
            # sglang-router takes one sampling_params per request: one request per seeded
            # sample, all with the prompt's routing key (one worker holds the group).
            singles = await asyncio.gather(
                *(
                    self.request(
                        "/generate",
                        {"input_ids": prompt, "sampling_params": p, **asks},
                        timeout_s=self.request_timeout_s,
                        group=prompt,
                    )
                    for p in per_sample
                )
            )
            return [s for out in singles for s in (out if isinstance(out, list) else [out])]
        payload = {
            "input_ids": [prompt] * n if n > 1 else prompt,
            "sampling_params": per_sample
            if n > 1 or isinstance(per_sample, dict)
            else per_sample[0],
            **asks,
        }
        out = await self.request(
            "/generate", payload, timeout_s=self.request_timeout_s, group=prompt
        )
        items = out if isinstance(out, list) else [out]
        if len(items) != n:
            raise RuntimeError(f"/generate returned {len(items)} results for {n} samples")
        return items

    async def abort_all(self) -> None:
        """Abort the requests in flight on every up server (``POST /abort_request`` with
        ``abort_all``): each aborted ``/generate`` answers with what it had generated. A server
        that does not answer is only logged (its requests fail, and are sent again)."""
        up = [i for i, state in enumerate(self.pool.state) if state == "up"]
        results = await asyncio.gather(
            *(self.post(i, "/abort_request", {"abort_all": True}, timeout_s=30.0) for i in up),
            return_exceptions=True,
        )
        for index, result in zip(up, results):
            if isinstance(result, BaseException):
                logger.warning(
                    "abort on sglang server %s failed: %r", self.pool.servers[index].url, result
                )

    def asks(self) -> dict[str, Any]:
        """What every ``/generate`` asks for besides the tokens."""
        asks: dict[str, Any] = {"return_logprob": True}
        if self.routed_top_k is not None:
            asks["return_routed_experts"] = True
        return asks

    async def request(
        self,
        path: str,
        payload: dict[str, Any],
        *,
        timeout_s: float | None = None,
        group: list[int] | None = None,
    ) -> Any:
        """POST to one server (least loaded, or the router's pick for ``/generate``), retrying
        after a failure. ``group``: the prompt whose samples the request holds; through the
        router its key (``routing_key``) sends every request of it to one worker."""
        if self.router is not None and path == "/generate":
            headers = {ROUTING_KEY_HEADER: routing_key(group)} if group is not None else {}
            return await self._request_via_router(path, payload, timeout_s, headers)
        last_error: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            index = await self.pool.acquire()
            try:
                out = await self.post(index, path, payload, timeout_s=timeout_s)
                if path == "/generate":
                    self.pool.requests[index] += 1
                    self.pool.cached_tokens[index] += cached_tokens(out)
                return out
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as err:
                last_error = err
                logger.warning(
                    "%s on %s failed (attempt %d): %r",
                    path,
                    self.pool.servers[index].url,
                    attempt + 1,
                    err,
                )
                await self.pool.report_failure(index)
                await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
            finally:
                await self.pool.release(index)
        raise RuntimeError(f"{path} failed after {self.max_retries + 1} attempts: {last_error!r}")

    async def _request_via_router(
        self, path: str, payload: dict[str, Any], timeout_s: float | None, headers: dict[str, str]
    ) -> Any:
        """POST through the router; after a failure, restart dead workers (in the background)
        and re-send once a worker is up again."""
        assert self.router is not None
        last_error: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            await self.pool.wait_any_up()
            try:
                out = await self.post_to(
                    self.router, path, payload, timeout_s=timeout_s, headers=headers
                )
                self.routed_requests += 1
                self.routed_cached_tokens += cached_tokens(out)
                return out
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as err:
                last_error = err
                logger.warning(
                    "%s through the router %s failed (attempt %d): %r",
                    path,
                    self.router.url,
                    attempt + 1,
                    err,
                )
                for index in range(len(self.pool.servers)):
                    await self.pool.report_failure(index)
                if not self.router.is_alive():
                    await asyncio.to_thread(self.router.restart)
                await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
        raise RuntimeError(
            f"{path} through the router failed after {self.max_retries + 1} attempts: "
            f"{last_error!r}"
        )

    async def post(
        self, index: int, path: str, payload: dict[str, Any], *, timeout_s: float | None = None
    ) -> Any:
        """POST ``payload`` to server ``index`` (see ``post_to``)."""
        return await self.post_to(self.pool.servers[index], path, payload, timeout_s=timeout_s)

    async def get(self, index: int, path: str, *, timeout_s: float = 10.0) -> Any:
        """GET ``path`` of server ``index`` (JSON); ``RuntimeError`` on a non-200 answer."""
        server = self.pool.servers[index]
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self.session().get(
            server.url + path, headers=server.auth_headers(), timeout=timeout
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"{server.url}{path} answered {response.status}")
            return await response.json(content_type=None)

    async def post_to(
        self,
        server: Endpoint,
        path: str,
        payload: dict[str, Any],
        *,
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """POST ``payload`` to ``server`` (with ``headers`` besides its auth); raise
        ``aiohttp.ClientResponseError`` on 5xx and ``RuntimeError`` (with the server's message)
        on other non-200 answers."""
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s)
        sent = {**server.auth_headers(), **(headers or {})}
        async with self.session().post(
            server.url + path, json=payload, headers=sent, timeout=timeout
        ) as response:
            body = await response.read()
            if response.status >= 500:
                response.raise_for_status()
            if response.status != 200:
                text = body.decode(errors="replace")[:2000]
                raise RuntimeError(f"{server.url}{path} answered {response.status}: {text}")
            try:
                return await response.json(content_type=None)
            except ValueError:
                return body.decode(errors="replace")

    async def post_all(
        self, path: str, payload: dict[str, Any] | Callable[[int], dict[str, Any]]
    ) -> list[Any]:
        """POST to every server at once (admin calls: weights, cache, memory); no retries."""
        return await asyncio.gather(
            *(
                self.post(i, path, payload(i) if callable(payload) else payload)
                for i in range(len(self.pool.servers))
            )
        )
