"""Streaming safetensors writer and the TP=1 region helper the model-free converter uses."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hpt_megatron.models.hf_io import write_safetensors_stream
from hpt_megatron.models.mapping import QKV, Dims, GateUp, Vocab, tp1_region

DIMS = Dims(heads=4, groups=2, head_dim=2, vocab=5)


def test_stream_writer_writes_what_safetensors_reads(tmp_path):
    fused = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    pairs = [
        ("a", fused[:3]),  # two views of one storage: save_file would refuse them
        ("b", fused[3:]),
        ("c", torch.randn(2, 3).to(torch.bfloat16)),
        ("d", torch.ones(0)),
    ]
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in pairs]
    write_safetensors_stream(tmp_path / "x.safetensors", entries, iter(pairs))
    got = load_file(tmp_path / "x.safetensors")
    assert list(got) == ["a", "b", "c", "d"]
    assert all(torch.equal(got[n], t) for n, t in pairs)


def test_stream_writer_refuses_a_tensor_unlike_its_entry(tmp_path):
    entries = [("a", torch.float32, (2, 2)), ("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match=r"expected \('b'.*got \('b', torch.float32, \(4,\)\)"):
        write_safetensors_stream(
            tmp_path / "x.safetensors",
            entries,
            iter([("a", torch.zeros(2, 2)), ("b", torch.zeros(4))]),
        )
    with pytest.raises(ValueError, match=r"expected \('b'.*got None"):
        short = iter([("a", torch.zeros(2, 2))])
        write_safetensors_stream(tmp_path / "y.safetensors", entries, short)


def test_gate_and_up_chunks_are_the_hf_tensors_themselves():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    full = GateUp().to_local([gate, up], 0, 1, torch.Size([12, 4]), DIMS)
    for start, want in (((0, 0), gate), ((6, 0), up)):
        got = tp1_region(GateUp(), [gate, up], start, (6, 4), torch.Size([12, 4]), DIMS)
        assert got.data_ptr() == want.data_ptr()  # no copy
        assert torch.equal(got, full[start[0] : start[0] + 6])
    with pytest.raises(ValueError, match=r"HF shapes \[\[6, 4\], \[5, 4\]\]"):
        tp1_region(GateUp(), [gate, up[:5]], (0, 0), (6, 4), torch.Size([12, 4]), DIMS)


def test_other_regions_are_cut_from_the_whole():
    q, k, v = torch.randn(8, 3), torch.randn(4, 3), torch.randn(4, 3)
    full = QKV().to_local([q, k, v], 0, 1, torch.Size([16, 3]), DIMS)
    got = tp1_region(QKV(), [q, k, v], (8, 0), (8, 3), torch.Size([16, 3]), DIMS)
    assert torch.equal(got, full[8:])
    emb = torch.randn(5, 3)
    padded = tp1_region(Vocab(), [emb], (0, 0), (8, 3), torch.Size([8, 3]), DIMS)
    assert torch.equal(padded[:5], emb) and not padded[5:].any()
    assert torch.equal(Vocab().to_hf([padded], DIMS)[0], emb)
