"""The fake SGLang servers of the unit tests (``tests/unit/rollout/fake_sglang/``): their config,
an engine that launches them, and the engine's servers as weight-sync targets."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.sglang import SGLangEngine
from hpt_megatron.rollout.weight_sync.distributed import Target

FAKE = Path(__file__).parents[1] / "unit" / "rollout" / "fake_sglang"


def fake_config(**overrides: object) -> SGLangConfig:
    """A CPU config whose ``sglang.launch_server`` is the fake's."""
    cfg = SGLangConfig(
        python=sys.executable,
        device="cpu",
        env={"PYTHONPATH": str(FAKE)},
        startup_timeout_s=30,
        request_timeout_s=30,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def fake_engine(tmp_path: Path, servers: int, **overrides: object) -> SGLangEngine:
    """``servers`` fake servers (no router) on an empty model folder under ``tmp_path``."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    cfg = fake_config(servers_per_node=servers, router=False, **overrides)
    return SGLangEngine.launch(cfg, model_path=model, run_dir=tmp_path)


def targets(engine: SGLangEngine) -> list[Target]:
    return [Target(i, s.url, s.auth_headers()) for i, s in enumerate(engine.servers)]


def one_rank_pusher(monkeypatch: Any, **kwargs: Any) -> tuple[Any, list[list[Any]]]:
    """A ``DistributedPusher`` of one rank and one stage (``kwargs``: its keyword arguments)
    whose export yields the buckets put into the returned list."""
    from hpt_megatron.rollout.weight_sync import distributed_pusher

    buckets: list[list[Any]] = []
    monkeypatch.setattr(
        distributed_pusher, "rank_export_buckets", lambda modules, hf, ctx, size: iter(buckets)
    )
    ctx = SimpleNamespace(is_driver=True, world_size=1, rank=0, pp=1, pp_rank=0, tp_rank=0)
    ctx.dp_rank = ctx.expert_dp_rank = 0
    pusher = distributed_pusher.DistributedPusher(
        [torch.nn.Linear(1, 1)], None, ctx, backend="gloo", **kwargs
    )
    return pusher, buckets
