"""The weight pusher: chosen by the plan; versioned folders written as ``v<N>.tmp`` and renamed,
no partial folder left by a failed write (single process, no process group)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hpt_megatron.config import load_config
from hpt_megatron.models.provider import load_hf_config
from hpt_megatron.rollout.plan import rollout_plan
from hpt_megatron.rollout.weight_sync import build_weight_pusher
from hpt_megatron.rollout.weight_sync import disk as disk_module
from hpt_megatron.rollout.weight_sync.disk import DiskPusher
from hpt_megatron.rollout.weight_sync.distributed_pusher import DistributedPusher
from hpt_megatron.rollout.weight_sync.folder import VersionFolder, dtype_name, write_version
from hpt_megatron.rollout.weight_sync.memory import MemoryPusher

TINY = "examples/tiny_cpu.yaml"
DRIVER = SimpleNamespace(is_driver=True, world_size=1)


class _Sink:
    def __init__(self) -> None:
        self.loaded: list[tuple[Any, int]] = []

    def update_weights(self, buckets: Any, version: int) -> None:
        self.loaded.append((list(buckets), version))

    def update_weights_from_disk(self, path: Any, version: int) -> None:
        self.loaded.append((Path(path), version))


def _chunk() -> torch.nn.Module:
    chunk = torch.nn.Linear(2, 2)
    chunk.config = SimpleNamespace(params_dtype=torch.bfloat16)  # type: ignore[assignment]
    return chunk


def test_a_version_folder_appears_only_complete(tmp_path: Path) -> None:
    seen = []

    def fill(tmp: Path) -> None:
        seen.append(tmp)
        (tmp / "a.safetensors").write_text("x")
        assert not (tmp_path / "v4").exists()  # readers see nothing until it is complete

    (tmp_path / "v4.tmp").mkdir()  # a crashed writer's partial folder
    (tmp_path / "v4.tmp" / "stale").write_text("old")
    final = write_version(tmp_path, 4, fill)
    assert seen == [tmp_path / "v4.tmp"] and final == tmp_path / "v4"
    assert sorted(p.name for p in final.iterdir()) == ["a.safetensors"]
    assert not (tmp_path / "v4.tmp").exists()

    # A version written again (a resumed run) replaces the old folder.
    def refill(tmp: Path) -> None:
        (tmp / "b.safetensors").write_text("y")

    write_version(tmp_path, 4, refill)
    assert sorted(p.name for p in final.iterdir()) == ["b.safetensors"]


def test_a_failed_write_leaves_no_partial_folder(tmp_path: Path) -> None:
    def fill(tmp: Path) -> None:
        (tmp / "half.safetensors").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_version(tmp_path, 2, fill)
    assert list(tmp_path.iterdir()) == []
    folder = VersionFolder(tmp_path, 3)
    folder.open()
    folder.discard()
    assert list(tmp_path.iterdir()) == []
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.float32) == "float32"


def test_disk_pusher_publishes_a_complete_hf_folder(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(TINY)
    hf = load_hf_config(dict(cfg.model.inline))

    def shards(modules, hf, folder: Path, ctx, bucket_bytes: int) -> list[str]:
        (folder / "model-rank0.safetensors").write_text("x")
        return ["model-rank0.safetensors"]

    monkeypatch.setattr(disk_module, "write_rank_shards", shards)
    monkeypatch.setattr(disk_module, "merge_shard_index", lambda folder, ctx, mine: 123)
    pusher = DiskPusher(tmp_path, [_chunk()], hf, DRIVER)  # type: ignore[arg-type]
    sink = _Sink()
    assert pusher.push(5, sink) == 123
    assert sink.loaded == [(tmp_path / "v5", 5)]
    files = sorted(p.name for p in (tmp_path / "v5").iterdir())
    assert files == ["config.json", "model-rank0.safetensors"]
    assert json.loads((tmp_path / "v5" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (tmp_path / "v5.tmp").exists()


def test_a_failed_disk_push_leaves_no_partial_folder(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(TINY)
    hf = load_hf_config(dict(cfg.model.inline))

    def half(modules, hf, folder: Path, ctx, bucket_bytes: int) -> list[str]:
        (folder / "model-rank0.safetensors").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(disk_module, "write_rank_shards", half)
    pusher = DiskPusher(tmp_path, [_chunk()], hf, DRIVER)  # type: ignore[arg-type]
    sink = _Sink()
    with pytest.raises(OSError, match="disk full"):
        pusher.push(6, sink)
    assert list(tmp_path.iterdir()) == [] and sink.loaded == []


def test_the_plan_chooses_the_pusher(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}"])
    hf = load_hf_config(dict(cfg.model.inline))
    chunks = [_chunk()]
    one = build_weight_pusher(rollout_plan(cfg, 1), chunks, hf, DRIVER)  # type: ignore[arg-type]
    assert isinstance(one, MemoryPusher) and not one.every_rank
    every = build_weight_pusher(rollout_plan(cfg, 2), chunks, hf, DRIVER)  # type: ignore[arg-type]
    assert isinstance(every, MemoryPusher) and every.every_rank
    cpu_servers = ["rollout.engine=sglang", "rollout.sglang.device=cpu"]
    sglang = load_config(TINY, [f"run.output_dir={tmp_path}", *cpu_servers])
    disk = build_weight_pusher(rollout_plan(sglang, 2), chunks, hf, DRIVER)  # type: ignore[arg-type]
    assert isinstance(disk, DiskPusher) and disk.root == (tmp_path / "rollout_weights").absolute()
    ctx = SimpleNamespace(is_driver=True, world_size=1, dp_rank=0, expert_dp_rank=0, tp_rank=0)
    gpu = load_config(TINY, [f"run.output_dir={tmp_path}", "rollout.engine=sglang"])
    tensor = build_weight_pusher(rollout_plan(gpu, 1), chunks, hf, ctx)  # type: ignore[arg-type]
    assert isinstance(tensor, DistributedPusher) and tensor.kind == "tensor"
    replay = load_config(TINY, ["run.replay_rollouts=/recorded", "run.val_every=0"])
    assert build_weight_pusher(rollout_plan(replay, 2), chunks, hf, DRIVER) is None  # type: ignore[arg-type]
