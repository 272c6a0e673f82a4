"""The ``rollout`` config section and its SGLang translator."""

from __future__ import annotations

import os

import pytest

from hpt_megatron.config.base import ConfigError, from_dict
from hpt_megatron.config.rollout import (
    CPU_SERVER_ARGS,
    RolloutConfig,
    SGLangConfig,
    sglang_server_args,
    sglang_server_env,
)
from hpt_megatron.config.schema import HPTConfig
from hpt_megatron.rollout.factory import sampling_params


def _args_dict(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_gpu_server_args_place_each_server_on_its_gpus() -> None:
    cfg = SGLangConfig(servers_per_node=2, tp_size=2, base_gpu_id=4, mem_fraction_static=0.7)
    args = _args_dict(sglang_server_args(cfg, model_path="/m", port=30001, server_index=1))
    assert args["--model-path"] == "/m" and args["--port"] == "30001"
    assert args["--host"] == "127.0.0.1" and args["--tp-size"] == "2"
    assert args["--base-gpu-id"] == "6" and args["--mem-fraction-static"] == "0.7"
    assert "--device" not in args and "--api-key" not in args
    assert "--sleep-on-idle" not in args  # SGLang's default on GPUs: the lowest latency
    cfg.sleep_on_idle = True
    assert "--sleep-on-idle" in sglang_server_args(cfg, model_path="/m", port=1)
    assert "--enable-return-routed-experts" not in args
    cfg.routed_experts = True  # routing replay of an MoE model
    assert "--enable-return-routed-experts" in sglang_server_args(cfg, model_path="/m", port=1)


def test_cpu_server_args_env_and_passthrough() -> None:
    cfg = SGLangConfig(
        device="cpu", max_total_tokens=4096, extra_args=["--skip-server-warmup"], env={"A": "1"}
    )
    args = sglang_server_args(cfg, model_path="/m", port=1, host="10.0.0.2", tokenizer_path="/t")
    joined = " ".join(args)
    assert " ".join(CPU_SERVER_ARGS) in joined and "--base-gpu-id" not in joined
    assert _args_dict(args)["--host"] == "10.0.0.2" and _args_dict(args)["--tokenizer-path"] == "/t"
    assert "--api-key" not in args  # the key never goes on a command line
    assert args[-1] == "--skip-server-warmup" and _args_dict(args)["--max-total-tokens"] == "4096"
    # An idle CPU server must not busy-poll the cores the trainer shares with it.
    assert "--sleep-on-idle" in args
    cfg.sleep_on_idle = False
    assert "--sleep-on-idle" not in sglang_server_args(cfg, model_path="/m", port=1)
    env = sglang_server_env(cfg)
    assert env == {"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_RETURN_ORIGINAL_LOGPROB": "1", "A": "1"}


@pytest.mark.parametrize(
    "section, key",
    [
        ({"n": 0}, "rollout.n"),
        ({"top_p": 0}, "rollout.top_p"),
        ({"top_k": 0}, "rollout.top_k"),
        ({"stop": [""]}, "rollout.stop"),
        ({"cpu": {"max_batch_rows": 0}}, "rollout.cpu.max_batch_rows"),
        ({"sglang": {"tp_size": 0}}, "rollout.sglang.tp_size"),
        ({"sglang": {"mem_fraction_static": 1.5}}, "rollout.sglang.mem_fraction_static"),
        (
            {"sglang": {"weight_sync": "tensor", "urls": ["http://h:1"]}},
            "rollout.sglang.weight_sync",
        ),
        ({"sglang": {"extra_args": ["--port", "1"]}}, "rollout.sglang.extra_args"),
        ({"sglang": {"max_restarts": -1}}, "rollout.sglang.max_restarts"),
        ({"sglang": {"urls": ["localhost:30000"]}}, "rollout.sglang.urls"),
        ({"sglang": {"urls": ["http://h"]}}, "rollout.sglang.urls"),
        ({"sglang": {"urls": ["http://h:1/generate"]}}, "rollout.sglang.urls"),
        ({"sglang": {"urls": ["http://h:1", "http://h:1/"]}}, "rollout.sglang.urls"),
        (
            {"sglang": {"urls": ["http://h:1"], "servers_per_node": 2}},
            "rollout.sglang.servers_per_node",
        ),
        ({"sglang": {"router": "sometimes"}}, "rollout.sglang.router"),
        ({"sglang": {"router_policy": "least_load"}}, "rollout.sglang.router_policy"),
        ({"sglang": {"device": "cpu", "cpu_threads": 0}}, "rollout.sglang.cpu_threads"),
        ({"sglang": {"cpu_threads": 2}}, "rollout.sglang.cpu_threads"),
    ],
)
def test_validation_names_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}"):
        from_dict(HPTConfig, {"rollout": section})


def test_defaults_are_valid_and_sampling_params_follow_the_section() -> None:
    cfg = from_dict(RolloutConfig, {"n": 4, "temperature": 0.6, "stop": ["</answer>"]})
    params = sampling_params(cfg, seed=3, n=1)
    assert (params.n, params.temperature, params.stop_strings, params.seed) == (
        1,
        0.6,
        ["</answer>"],
        3,
    )
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        sampling_params(cfg, bogus=1)


def test_python_executable_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPT_SGLANG_VENV", "/x/venv")
    assert SGLangConfig().python_executable() == "/x/venv/bin/python"
    assert SGLangConfig(python="/p").python_executable() == "/p"


def test_preflight_of_external_servers_and_the_router(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With urls nothing is launched: no SGLang python needed, unless the router is asked for;
    a named API-key variable must be set."""
    from hpt_megatron.orchestration.preflight import _check_sglang

    missing = str(tmp_path / "nope" / "python")

    def cfg(**sglang: object) -> HPTConfig:
        section = {"engine": "sglang", "sglang": {"python": missing, **sglang}}
        return from_dict(HPTConfig, {"rollout": section})

    _check_sglang(cfg(urls=["http://10.0.0.1:30000"], router=False))
    _check_sglang(cfg(urls=["http://10.0.0.1:30000", "http://10.0.0.2:30000"]))  # auto: client
    with pytest.raises(ConfigError, match="needs SGLang's python"):
        _check_sglang(cfg(urls=["http://10.0.0.1:30000"], router=True))
    with pytest.raises(ConfigError, match="needs SGLang's python"):
        _check_sglang(cfg(device="cpu"))
    monkeypatch.delenv("HPT_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="HPT_TEST_KEY is unset"):
        _check_sglang(cfg(urls=["http://10.0.0.1:30000"], router=False, api_key_env="HPT_TEST_KEY"))


def test_cpu_servers_and_trainer_ranks_split_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Colocated (turns): the node's servers share all its cores, the trainer keeps its own.
    Disaggregated (at once): servers half, the node's trainer ranks the rest. The servers get it
    as OMP_NUM_THREADS, which overrides torchrun's 1 but not the user's own env."""
    from hpt_megatron.config import load_config
    from hpt_megatron.rollout.plan import cpu_thread_split, sglang_rollout

    sglang = ["rollout.engine=sglang", "rollout.sglang.device=cpu"]
    off = [*sglang, "run.placement=disaggregated", "run.max_staleness=2"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    colocated = load_config("examples/tiny_cpu.yaml", sglang)
    assert cpu_thread_split(colocated, cores=16) == (16, None)
    assert cpu_thread_split(colocated, cores=2) == (2, None)
    assert cpu_thread_split(load_config("examples/tiny_cpu.yaml", off), cores=16) == (8, 4)
    two = load_config("examples/tiny_cpu.yaml", [*off, "rollout.sglang.servers_per_node=2"])
    assert cpu_thread_split(two, cores=16) == (4, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cpu_thread_split(load_config("examples/tiny_cpu.yaml", off), cores=2) == (1, 1)
    fixed = load_config("examples/tiny_cpu.yaml", [*off, "rollout.sglang.cpu_threads=6"])
    assert cpu_thread_split(fixed, cores=8) == (6, 2)
    assert cpu_thread_split(fixed, cores=4) == (6, 1)  # the trainer keeps at least one
    # No CPU servers launched by the run: nothing to split.
    assert cpu_thread_split(load_config("examples/tiny_cpu.yaml"), cores=2) is None
    external = [*off, "rollout.sglang.urls=[http://10.0.0.1:30000]"]
    assert cpu_thread_split(load_config("examples/tiny_cpu.yaml", external), cores=2) is None
    replay = [*off, "run.replay_rollouts=/recorded", "run.val_every=0"]
    assert cpu_thread_split(load_config("examples/tiny_cpu.yaml", replay), cores=2) is None

    cores = len(os.sched_getaffinity(0))
    env = sglang_rollout(colocated).sglang.env
    assert env == {"OMP_NUM_THREADS": str(cores)}
    mine = load_config(
        "examples/tiny_cpu.yaml", [*sglang, "rollout.sglang.env={OMP_NUM_THREADS: '3'}"]
    )
    assert sglang_rollout(mine).sglang.env == {"OMP_NUM_THREADS": "3"}
