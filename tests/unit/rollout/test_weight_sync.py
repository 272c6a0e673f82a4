"""Weight-sync payloads that need no server: safetensors snapshots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpt_megatron.rollout.sglang.weight_sync.disk import write_safetensors, write_snapshot


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
