"""Weight-sync payloads that need no server: safetensors snapshots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpt_megatron.rollout.weight_sync.disk import write_safetensors, write_snapshot


def _bucket() -> list[tuple[str, torch.Tensor]]:
    tied = torch.randn(4, 3)
    return [
        ("model.embed_tokens.weight", tied),
        ("lm_head.weight", tied),  # tied weights share storage
        ("b", torch.randn(5).to(torch.bfloat16)),
        ("c", torch.arange(3)),
        ("scalar", torch.tensor(2.5)),
        ("transposed", torch.randn(3, 4).t()),
    ]


def test_safetensors_round_trip(tmp_path: Path) -> None:
    bucket = _bucket()
    write_safetensors(tmp_path / "x.safetensors", bucket)
    got = load_file(str(tmp_path / "x.safetensors"))
    assert list(got) == [n for n, _ in bucket]
    assert all(torch.equal(got[n], t) for n, t in bucket)
    with pytest.raises(ValueError, match="the tensor name 'c' is repeated"):
        write_safetensors(tmp_path / "y.safetensors", [("c", torch.ones(1))] * 2)


def test_snapshot_is_complete_or_absent(tmp_path: Path) -> None:
    path = write_snapshot([_bucket()[:2], _bucket()[2:]], tmp_path, version=7)
    assert path == tmp_path / "v7" and not (tmp_path / "v7.tmp").exists()
    assert sorted(p.name for p in path.iterdir()) == [
        "bucket-00000.safetensors",
        "bucket-00001.safetensors",
    ]
    with pytest.raises(ValueError, match="no tensors"):
        write_snapshot([], tmp_path, version=8)
    assert not (tmp_path / "v8").exists()


def test_loading_a_version_removes_only_older_folders(tmp_path: Path) -> None:
    """Against the fake server: once ``v2`` is loaded on every server, ``v1`` (and a crashed
    ``v0.tmp``) are deleted, while ``v3.tmp`` (the trainer writing the next version) stays; a
    folder outside the sync directory is never touched."""
    import sys

    from hpt_megatron.config.rollout import SGLangConfig
    from hpt_megatron.rollout.sglang import SGLangEngine

    fake = Path(__file__).parent / "fake_sglang"
    cfg = SGLangConfig(
        python=sys.executable, device="cpu", env={"PYTHONPATH": str(fake)}, startup_timeout_s=30
    )
    cfg.servers_per_node = 2
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    root = tmp_path / "run" / "rollout_weights"
    for name in ("v0.tmp", "v1", "v2", "v3.tmp", "vendor"):
        (root / name).mkdir(parents=True)
    outside = tmp_path / "v0"
    outside.mkdir()
    with SGLangEngine.launch(cfg, model_path=model, run_dir=tmp_path / "run") as engine:
        engine.update_weights_from_disk(root / "v2", version=2)
        assert engine.weight_version == 2
        assert sorted(p.name for p in root.iterdir()) == ["v2", "v3.tmp", "vendor"]
        engine.update_weights_from_disk(outside, version=5)  # any folder loads
    assert outside.is_dir() and (root / "v2").is_dir()


def test_a_restart_ending_during_a_load_gets_that_version(tmp_path: Path) -> None:
    """Server 1 is being restarted when version 6's load begins, so the load leaves it out; its
    restart ends while the load is under way, having resynced the version it saw (5). The load
    sends 6 to it too, and from its start names 6 as the newest (a resync then takes 6).

    The order of events is forced with a stand-in client: the two-node SGLang test met this
    race on a loaded machine (``check_weights`` found version 5 on the restarted server)."""
    import asyncio
    from types import SimpleNamespace

    from hpt_megatron.rollout.weight_sync.disk import DiskTransport

    transport = DiskTransport(tmp_path)
    transport.latest, transport.latest_version = tmp_path / "v5", 5
    posts: list[tuple[int, str]] = []
    newest_during_load: list[Path | None] = []

    async def post(i: int, route: str, payload: dict) -> dict:
        assert route == "/update_weights_from_disk"
        posts.append((i, payload["weight_version"]))
        if i == 0:  # while server 0 loads version 6, server 1's restart ends
            newest_during_load.append(transport.latest)
            client.pool.state[1] = "up"
        return {"success": True}

    client = SimpleNamespace(pool=SimpleNamespace(state=["up", "restarting"]), post=post)
    asyncio.run(transport.load(client, tmp_path / "v6", 6))  # type: ignore[arg-type]
    assert posts == [(0, "6"), (1, "6")]
    assert newest_during_load == [tmp_path / "v6"]
    assert (transport.latest, transport.latest_version) == (tmp_path / "v6", 6)
