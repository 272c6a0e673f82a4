"""The ``rollout`` section: engine choice, sampling, and the SGLang servers.

``sglang_server_args`` is the pure translator from this section to ``sglang.launch_server``
arguments (no process is started here; see ``hpt_megatron.rollout.sglang.server``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_SGLANG_VENV = "/opt/hpt-sglang-venv"  # tools/sglang_env.sh builds it; env HPT_SGLANG_VENV

# What SGLang 0.5.23 needs to serve on CPU (docs/architecture.md (What runs where)).
CPU_SERVER_ARGS = (
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--sampling-backend",
    "pytorch",
    "--disable-cuda-graph",
)


def check_sampling(
    n: int, temperature: float, top_p: float, top_k: int = -1, *, prefix: str = ""
) -> None:
    """Raise ``ValueError`` naming the first sampling setting out of range, as ``PREFIX<name>``
    (the rollout section, validation's ``run.val_*`` and the engines' ``SamplingParams``)."""
    if n < 1:
        raise ValueError(f"{prefix}n: must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"{prefix}temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{prefix}top_p: must be in (0, 1], got {top_p}")
    if top_k == 0 or top_k < -1:
        raise ValueError(f"{prefix}top_k: must be -1 (off) or >= 1, got {top_k}")


@dataclass(kw_only=True)
class CpuEngineConfig:
    """The in-process CPU engine (``rollout.engine: cpu``)."""

    max_batch_rows: int = 512  # (prompt x sample) rows decoded together
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Intra-op threads while generating. 0 (auto): colocated with data-parallel generation, the
    # node's cores split over its ranks; colocated without, the threads of every trainer rank on
    # the node (they wait idle during generation); disaggregated, the driver's own (training runs
    # at the same time).
    threads: int = 0
    # Data-parallel generation: every rank of the run holds a replica of the engine and generates
    # its share of the prompts (rollout/replicas.py). None (auto): on when colocated over several
    # ranks; true: the same, an error where it cannot run (disaggregated, SGLang, a replay).
    data_parallel: bool | None = None

    def validate(self) -> None:
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows: must be >= 1, got {self.max_batch_rows}")
        if self.threads < 0:
            raise ValueError(f"threads: must be >= 0 (0: auto), got {self.threads}")


@dataclass(kw_only=True)
class SGLangConfig:
    """SGLang servers (``rollout.engine: sglang``): launch, client and weight sync."""

    python: str | None = None  # the SGLang venv's python; None: $HPT_SGLANG_VENV/bin/python
    device: Literal["cuda", "cpu"] = "cuda"  # cpu: adds CPU_SERVER_ARGS and SGLANG_USE_CPU_ENGINE
    # Servers on every node of the run (torchrun's nodes: the node's local rank 0 starts them on
    # that node's GPUs, base_gpu_id and gpu_id_step being node-local ids).
    servers_per_node: int = 1
    tp_size: int = 1
    base_gpu_id: int = 0  # server i uses GPUs base_gpu_id + i * tp_size * gpu_id_step, ...
    gpu_id_step: int = 1
    mem_fraction_static: float | None = None  # None: SGLang's default
    max_total_tokens: int | None = None  # KV-cache size in tokens (on CPU, keeps RAM bounded)
    context_length: int | None = None
    dtype: str = "auto"
    # The address the servers bind to. None: 127.0.0.1 on a one-node run; with several nodes,
    # what the node's hostname resolves to (rollout/sglang/nodes.py: bind_host). A server bound to
    # anything but loopback always has an API key (api_key_env's, or one generated per run).
    host: str | None = None
    base_port: int = 0  # 0: free ports; otherwise server i listens on base_port + i
    api_key_env: str | None = None  # name of an environment variable holding the API key
    # Servers (or one sglang-router) that the user started: nothing is launched or stopped, the
    # run checks they answer /health before step 1 and loads weights into them (disk transport:
    # weight_sync_dir must be a path every one of them can read).
    urls: list[str] = field(default_factory=list)
    # sglang-router in front of the servers (started by the driver with the workers' URLs):
    # auto = with two servers or more, when sglang-router is installed; else the client balances.
    router: bool | Literal["auto"] = "auto"
    # manual: a prompt's requests (its n samples, their continuations, the same prompt in a later
    # step) carry one routing key, so they go to one worker, and a new prompt to the least-loaded
    # one; the others are the router's choice per request (a seeded group's n requests, one
    # per sample, may then be split between workers).
    router_policy: Literal["manual", "cache_aware", "round_robin", "power_of_two", "random"] = (
        "manual"
    )
    # SGLang's --sleep-on-idle: an idle server's scheduler waits on its sockets instead of
    # polling them in a busy loop. None: on with device cpu, where the servers share the node's
    # cores with the trainer (busy-polling, it made the tiny run's update take 0.8 to 13.5 s on
    # the same work, benchmarks/async_speedup.py); off on GPUs (SGLang's default, the lowest
    # latency, one polling core per server).
    sleep_on_idle: bool | None = None
    # device cpu: the threads each server's forward runs on (its OMP_NUM_THREADS). None: the
    # node's cores divided among its servers, colocated (generation and training take turns);
    # disaggregated, half of that, the trainer ranks of the node taking the other half
    # (rollout/plan.py: cpu_thread_split). Both running all the cores' worth of OpenMP
    # threads at once slowed each about 2x (benchmarks/async_speedup.py).
    cpu_threads: int | None = None
    extra_args: list[str] = field(default_factory=list)  # passed through to launch_server
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the servers
    return_original_logprob: bool = True  # raw-model log-probs (temperature 1), as the trainer
    seeded_sampling: bool = False  # send per-sample seeds (needs the pytorch sampling backend)
    # Mixture-of-experts models: the servers report the experts they routed each token to
    # (--enable-return-routed-experts, return_routed_experts on every request), which routing
    # replay (algorithm.options.routing_replay: rollout) trains with.
    routed_experts: bool = False
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 1800.0
    max_retries: int = 3  # per request, across servers
    max_restarts: int = 2  # per server, after a crash
    max_concurrency: int = 64  # in-flight requests per server
    # How new weights reach the servers. "disk": every pipeline stage writes its own
    # safetensors shards, the servers load the folder. "distributed": each pipeline stage's
    # exporting rank broadcasts its buckets into an update group with every server (gloo on CPU
    # servers, NCCL on GPU ones; colocated placement, servers the run launches, no expert
    # parallelism; a restarted server serves again after the next push). "tensor": the same
    # on one node, with no group: handles to the buckets' memory (shared-memory files on CPU,
    # CUDA IPC on GPU). "auto": tensor for colocated GPU servers on one node, else disk; the
    # log says which and why (rollout/plan.py: weight_sync_choice).
    weight_sync: Literal["auto", "disk", "tensor", "distributed"] = "auto"
    weight_sync_dir: str | None = None  # disk transport; None: <run_dir>/rollout_weights
    # distributed: the bound of each group join, broadcast and weight-update call.
    weight_sync_timeout_s: float = 600.0
    # After every weight load, read each synced tensor back from every server
    # (/get_weights_by_name) and require it to equal what was sent (the folder's; under
    # distributed, each bucket right after its broadcast), rounded to the precision the server
    # runs in (dtype auto serves a float32 model in float16): a debugging check for small
    # models (slime's --check-weight-update-equal); a mismatch stops the run naming the tensor.
    check_weights: bool = False
    log_dir: str | None = None  # None: <run_dir>/sglang_logs

    def validate(self) -> None:
        self._validate_numbers()
        self._validate_weight_sync()
        self._validate_urls()
        reserved = {"--model-path", "--port", "--host", "--api-key", "--tp-size", "--base-gpu-id"}
        clash = sorted(reserved.intersection(a.split("=")[0] for a in self.extra_args))
        if clash:
            raise ValueError(f"extra_args: {clash} are set from this section; remove them")

    def _validate_numbers(self) -> None:
        """Counts, ports, memory and time limits in their ranges."""
        for key in ("servers_per_node", "tp_size", "gpu_id_step", "max_concurrency"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads: must be >= 1 (or null: auto), got {self.cpu_threads}")
        if self.cpu_threads is not None and self.device != "cpu":
            raise ValueError("cpu_threads: sets a CPU server's threads; device is not cpu")
        for key in ("base_gpu_id", "max_retries", "max_restarts"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.base_port < 65536 - self.servers_per_node:
            raise ValueError(f"base_port: must be 0 or a free port range, got {self.base_port}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(
                f"mem_fraction_static: must be in (0, 1), got {self.mem_fraction_static}"
            )
        for key in ("max_total_tokens", "context_length"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        for key in ("startup_timeout_s", "request_timeout_s", "weight_sync_timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")

    def _validate_weight_sync(self) -> None:
        """``distributed`` and ``tensor`` need servers the run launches (the placement, the
        nodes and the parallel layout are checked by preflight)."""
        if self.weight_sync == "tensor" and self.urls:
            raise ValueError(
                "weight_sync: tensor: the servers of urls may run on another host (tensor "
                "hands them this host's memory); use auto or disk"
            )
        if self.weight_sync == "distributed" and self.urls:
            raise ValueError(
                "weight_sync: distributed: the servers of urls may not reach the trainer ranks "
                "(they join a process group with them); use auto or disk"
            )

    def _validate_urls(self) -> None:
        """The user's servers: base URLs, each once, and then no servers of ours."""
        for i, url in enumerate(self.urls):
            problem = _url_problem(url)
            if problem:
                raise ValueError(f"urls[{i}]: {url!r} {problem}")
        if len(set(u.rstrip("/") for u in self.urls)) != len(self.urls):
            raise ValueError(f"urls: the same server is listed twice in {self.urls}")
        if self.urls and self.servers_per_node != 1:
            raise ValueError(
                "servers_per_node: servers are launched only without urls; with urls, list every "
                "server there"
            )

    def sync_dir(self, run_dir: str | os.PathLike[str]) -> Path:
        """The disk transport's folder of weight versions (absolute: servers have their own
        working directories)."""
        return Path(self.weight_sync_dir or Path(run_dir) / "rollout_weights").absolute()

    def logs_dir(self, run_dir: str | os.PathLike[str]) -> Path:
        """Where the servers' (and the router's) logs go."""
        return Path(self.log_dir) if self.log_dir else Path(run_dir) / "sglang_logs"

    def python_executable(self) -> str:
        """The configured SGLang Python, or the default venv's (``HPT_SGLANG_VENV``)."""
        if self.python:
            return self.python
        return os.path.join(os.environ.get("HPT_SGLANG_VENV", DEFAULT_SGLANG_VENV), "bin", "python")


@dataclass(kw_only=True)
class RolloutConfig:
    """Which engine generates rollouts, and how they are sampled."""

    engine: Literal["cpu", "sglang"] = "cpu"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    stop: list[str] = field(default_factory=list)  # stop strings, besides EOS
    # Partial rollouts (disaggregated): weights pushed mid-generation are loaded between two
    # decode steps (CPU engine), or the requests in flight are aborted and sent again as prompt
    # + partial response after the load (SGLang); the responses continue with the new weights
    # (each token keeps the version and log-prob it was sampled with).
    partial: bool = False
    cpu: CpuEngineConfig = field(default_factory=CpuEngineConfig)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)

    def validate(self) -> None:
        check_sampling(self.n, self.temperature, self.top_p, self.top_k)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop: empty stop strings are not allowed")


def _url_problem(url: str) -> str | None:
    """Why ``url`` is not a server base URL (``http[s]://host:port``), or ``None``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        return f"is not a URL ({err})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be http://host:port or https://host:port"
    if port is None:
        return "has no port"
    if parts.path.strip("/") or parts.query:
        return "must be a server's base URL, without a path"
    return None


def sglang_server_args(
    cfg: SGLangConfig,
    *,
    model_path: str,
    port: int,
    server_index: int = 0,
    host: str = "127.0.0.1",
    tokenizer_path: str | None = None,
) -> list[str]:
    """Command-line arguments of ``python -m sglang.launch_server`` for server ``server_index``.

    Args:
        cfg: the ``rollout.sglang`` section.
        model_path: HF folder to serve.
        port: this server's port.
        server_index: which of ``cfg.servers_per_node`` servers (picks its GPUs).
        host: the address to bind (``nodes.bind_host``).
        tokenizer_path: a different tokenizer folder (e.g. when serving a weights-only snapshot).

    The API key is not among them: ``ServerLaunch.api_key`` hands it to the server outside its
    command line (which ``ps`` shows to every user of the node).
    """
    args = ["--model-path", model_path, "--host", host, "--port", str(port)]
    if tokenizer_path:
        args += ["--tokenizer-path", tokenizer_path]
    args += ["--tp-size", str(cfg.tp_size), "--dtype", cfg.dtype]
    if cfg.device == "cpu":
        args += list(CPU_SERVER_ARGS)
    else:
        base_gpu = cfg.base_gpu_id + server_index * cfg.tp_size * cfg.gpu_id_step
        args += ["--base-gpu-id", str(base_gpu), "--gpu-id-step", str(cfg.gpu_id_step)]
    if cfg.mem_fraction_static is not None:
        args += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.max_total_tokens is not None:
        args += ["--max-total-tokens", str(cfg.max_total_tokens)]
    if cfg.context_length is not None:
        args += ["--context-length", str(cfg.context_length)]
    if cfg.sleep_on_idle or (cfg.sleep_on_idle is None and cfg.device == "cpu"):
        args += ["--sleep-on-idle"]
    if cfg.routed_experts:
        args += ["--enable-return-routed-experts"]
    return args + list(cfg.extra_args)


def sglang_server_env(cfg: SGLangConfig) -> dict[str, str]:
    """Environment variables (added to the parent's) for every server of ``cfg``."""
    env: dict[str, str] = {}
    if cfg.device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    if cfg.return_original_logprob:
        env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
    env.update(cfg.env)
    return env
