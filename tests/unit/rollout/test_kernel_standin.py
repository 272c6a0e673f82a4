"""The pure-torch stand-in for SGLang's kernel package, checked against a per-request loop."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import hpt_megatron.rollout as rollout_pkg

STANDIN = Path(rollout_pkg.__file__).parent / "sglang/kernel_standin/sgl_kernel/__init__.py"


@pytest.fixture(scope="module")
def sgl_kernel():  # a module
    spec = importlib.util.spec_from_file_location("hpt_test_sgl_kernel_standin", STANDIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_assign_req_to_token_pool_cpu(sgl_kernel) -> None:
    req_pool_indices = torch.tensor([2, 4, 1], dtype=torch.int64)
    req_to_token = torch.zeros((5, 32), dtype=torch.int32)
    want = req_to_token.clone()
    start, end = torch.tensor([0, 3, 8]), torch.tensor([6, 3, 15])
    out_cache_loc = torch.randperm(4096)[: int((end - start).sum())]
    sgl_kernel.assign_req_to_token_pool_cpu(
        req_pool_indices, req_to_token, start, end, out_cache_loc, 32
    )
    offset = 0
    for i in range(3):
        n = int(end[i] - start[i])
        want[req_pool_indices[i], start[i] : end[i]] = out_cache_loc[offset : offset + n].int()
        offset += n
    assert torch.equal(req_to_token, want)


def test_copy_all_layer_kv_cache_cpu(sgl_kernel) -> None:
    layers = [torch.randn(10, 3, 4) for _ in range(2)]
    want = [t.clone() for t in layers]
    tgt, src = torch.tensor([7, 0]), torch.tensor([1, 5])
    for t in want:
        t[tgt] = t[src].clone()
    sgl_kernel.copy_all_layer_kv_cache_cpu(
        torch.tensor([t.data_ptr() for t in layers]),
        torch.tensor([t[0].numel() * t.element_size() for t in layers]),
        tgt,
        src,
    )
    assert all(torch.equal(a, b) for a, b in zip(layers, want))


def test_unsupported_ops_fail_loudly(sgl_kernel) -> None:
    with pytest.raises(NotImplementedError, match="verify_tree_greedy_cpu"):
        sgl_kernel.verify_tree_greedy_cpu()


def test_cpu_host_buffers_are_allocated_unpinned(tmp_path: Path) -> None:
    """SGLang pins host buffers (the routed-experts cache) through ``torch.cuda.cudart()``: once
    the stand-in is imported, its host-pool module allocates device "cpu" buffers unpinned."""
    import subprocess
    import sys

    pool = tmp_path / "sglang/srt/mem_cache/pool_host"
    pool.mkdir(parents=True)
    for folder in (
        "sglang",
        "sglang/srt",
        "sglang/srt/mem_cache",
        "sglang/srt/mem_cache/pool_host",
    ):
        (tmp_path / folder / "__init__.py").touch()
    (pool / "common.py").write_text(
        "def alloc_with_host_register(*a, **k):\n"
        "    raise RuntimeError('Found no NVIDIA driver')\n"
        "ALLOC_MEMORY_FUNCS = {}\n"
    )
    (tmp_path / "sgl_kernel").symlink_to(STANDIN.parent)
    script = (
        "import torch, sgl_kernel\n"
        "from sglang.srt.mem_cache.pool_host import common\n"
        "class Allocator:\n"
        "    def allocate(self, dims, dtype, device):\n"
        "        return torch.zeros(dims, dtype=dtype, device=device)\n"
        "buf = common.ALLOC_MEMORY_FUNCS['cpu']((3, 2), torch.int32, 'cpu', True, Allocator())\n"
        "assert buf.shape == (3, 2) and not buf.is_pinned()\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
