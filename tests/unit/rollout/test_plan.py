"""The rollout plan: each engine / placement / world combination and the decisions it makes."""

from __future__ import annotations

import os

import pytest
import torch

from hpt_megatron.config import load_config
from hpt_megatron.rollout.plan import ThreadCounts, rollout_plan
from hpt_megatron.rollout.seeds import derive_seed

TINY = "examples/tiny_cpu.yaml"
ASYNC = ["run.placement=disaggregated", "run.max_staleness=1"]
SGLANG_CPU = ["rollout.engine=sglang", "rollout.sglang.device=cpu"]


@pytest.fixture(autouse=True)
def _two_ranks_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")


def test_cpu_engine_colocated_generates_on_every_rank_over_several() -> None:
    own, cores = torch.get_num_threads(), len(os.sched_getaffinity(0))
    plan = rollout_plan(load_config(TINY), world_size=2)
    assert plan.engine == "cpu" and plan.colocated and not plan.launches_servers
    assert plan.data_parallel and plan.every_rank_loads
    assert plan.transport == "memory" and plan.sync_dir is None
    assert plan.threads == ThreadCounts(generation=max(own, cores // 2))
    alone = rollout_plan(load_config(TINY), world_size=1)
    assert not alone.data_parallel and not alone.every_rank_loads
    assert alone.threads == ThreadCounts(generation=max(1, min(2 * own, cores)))


def test_cpu_engine_disaggregated_generates_on_the_driver_only() -> None:
    plan = rollout_plan(load_config(TINY, ASYNC), world_size=2)
    assert plan.engine == "cpu" and not plan.colocated
    assert not plan.data_parallel and not plan.every_rank_loads and plan.transport == "memory"
    assert plan.threads == ThreadCounts(generation=torch.get_num_threads())
    off = rollout_plan(load_config(TINY, ["rollout.cpu.data_parallel=false"]), world_size=2)
    assert not off.data_parallel and off.colocated


def test_sglang_cpu_servers_sync_by_disk_and_split_the_cores(tmp_path) -> None:
    run_dir = f"run.output_dir={tmp_path}"
    colocated = rollout_plan(load_config(TINY, [*SGLANG_CPU, run_dir]), world_size=2, cores=16)
    assert colocated.engine == "sglang" and colocated.launches_servers
    assert not colocated.data_parallel and not colocated.every_rank_loads
    assert colocated.transport == "disk"
    assert colocated.sync_dir == (tmp_path / "rollout_weights").absolute()
    assert colocated.threads == ThreadCounts(server=16)
    assert colocated.rollout.sglang.env == {"OMP_NUM_THREADS": "16"}
    apart = rollout_plan(load_config(TINY, [*SGLANG_CPU, *ASYNC]), world_size=2, cores=16)
    assert not apart.colocated and apart.threads == ThreadCounts(server=8, trainer=4)


def test_external_sglang_servers_launch_nothing_and_split_no_cores() -> None:
    urls = [*SGLANG_CPU, "rollout.sglang.urls=[http://10.0.0.1:30000]"]
    plan = rollout_plan(load_config(TINY, urls), world_size=2, cores=16)
    assert plan.engine == "sglang" and not plan.launches_servers and plan.transport == "disk"
    assert plan.threads == ThreadCounts() and plan.rollout.sglang.env == {}


def test_auto_weight_sync_picks_tensor_only_for_colocated_gpu_servers_on_one_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each case of ``weight_sync_choice``: the transport, a reason naming what decided it, and
    the engine's side told the same transport."""
    gpu = ["rollout.engine=sglang", "rollout.sglang.device=cuda"]
    cases = [
        (gpu, "tensor", "CUDA IPC"),
        (SGLANG_CPU, "disk", "CPU servers"),
        ([*gpu, *ASYNC], "disk", "disaggregated"),
        ([*gpu, "rollout.sglang.urls=[http://10.0.0.1:30000]"], "disk", "urls"),
        ([*SGLANG_CPU, "rollout.sglang.weight_sync=tensor"], "tensor", "names it"),
        ([*gpu, "rollout.sglang.weight_sync=disk"], "disk", "names it"),
    ]
    for overrides, transport, why in cases:
        plan = rollout_plan(load_config(TINY, overrides), world_size=2, cores=16)
        assert (plan.transport, plan.rollout.sglang.weight_sync) == (transport, transport)
        assert why in plan.transport_reason, (overrides, plan.transport_reason)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two nodes of one rank each
    plan = rollout_plan(load_config(TINY, gpu), world_size=2, cores=16)
    assert plan.transport == "disk" and "several nodes" in plan.transport_reason


def test_colocated_gpu_servers_get_the_memory_saver_once() -> None:
    gpu = ["rollout.engine=sglang", "rollout.sglang.device=cuda"]
    plan = rollout_plan(load_config(TINY, gpu), world_size=1, cores=16)
    assert plan.rollout.sglang.extra_args.count("--enable-memory-saver") == 1
    asked = [*gpu, "rollout.sglang.extra_args=[--enable-memory-saver]"]
    plan = rollout_plan(load_config(TINY, asked), world_size=1, cores=16)
    assert plan.rollout.sglang.extra_args == ["--enable-memory-saver"]
    for other in (SGLANG_CPU, [*gpu, *ASYNC]):
        plan = rollout_plan(load_config(TINY, other), world_size=1, cores=16)
        assert "--enable-memory-saver" not in plan.rollout.sglang.extra_args


def test_a_replay_builds_no_engine_and_syncs_nothing() -> None:
    replay = ["run.replay_rollouts=/recorded", "run.val_every=0"]
    for engine in ([], SGLANG_CPU):
        plan = rollout_plan(load_config(TINY, [*engine, *replay]), world_size=2, cores=16)
        assert plan.engine is None and plan.transport is None and plan.sync_dir is None
        assert not plan.data_parallel and not plan.launches_servers
        assert plan.threads == ThreadCounts()


def test_the_cpu_engine_takes_the_rollout_section_as_it_is() -> None:
    cfg = load_config(TINY)
    assert rollout_plan(cfg, world_size=1).rollout is cfg.rollout


def test_seeds_keep_their_formulas() -> None:
    """Recorded runs and tests rely on these values (rollout/seeds.py's table)."""
    assert derive_seed(1234, "sampler") == 1234 == derive_seed(1234, "engine_init")
    assert derive_seed(1234, "rollout", step=5) == 1234 * 100_003 + 5
    assert derive_seed(7, "replica", rank=2) == 7 * 1_000_003 + 2
    assert derive_seed(10**6, "sample", rank=3) == (10**6 * 1_000_003 + 3) % 2**31
    assert len({derive_seed(1, "rollout", step=s) for s in range(100)}) == 100
    with pytest.raises(ValueError, match="unknown seed purpose"):
        derive_seed(1, "nonsense")  # type: ignore[arg-type]


def test_building_a_cpu_engine_leaves_the_global_generator_alone() -> None:
    from hpt_megatron.rollout.cpu_engine import HFCpuEngine
    from tests.helpers.tiny_hf import tiny_config

    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    config = tiny_config("llama")
    first = HFCpuEngine.from_config(config, seed=11)
    assert torch.equal(torch.rand(3), want)
    second = HFCpuEngine.from_config(config, seed=11)
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
