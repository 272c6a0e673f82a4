"""Pure-torch stand-in for SGLang's compiled kernel package (``sgl_kernel``), for CPU tests.

SGLang's real kernel wheel loads CUDA libraries at import, so it cannot be imported on a machine
without a GPU driver. With ``SGLANG_USE_CPU_ENGINE=1``, ``--attention-backend torch_native`` and
``--sampling-backend pytorch``, a plain dense model (Qwen2, Llama) needs only the function below
from it; everything else falls back to torch. ``tools/sglang_env.sh`` copies this package over the
real one in the SGLang virtual environment. It registers no ``torch.ops.sgl_kernel`` ops, so
SGLang's AMX checks report "unsupported" and it takes its plain-torch paths.

It also redirects one hard-coded CUDA call, as ``hpt_megatron/_compat`` does for Megatron:
SGLang allocates host buffers on device "cpu" (the routed-experts cache of
``--enable-return-routed-experts``) pinned through ``torch.cuda.cudart()``, which fails without
a GPU driver; see :func:`_plain_cpu_host_buffers`.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

__version__ = "0.0.0+hpt-standin"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Scatter new KV-cache slots into the request-to-token map, in place.

    For each request i: ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]``
    receives the next ``end_offset[i] - start_offset[i]`` entries of ``out_cache_loc``.
    """
    if req_to_token.dim() != 2 or req_to_token.shape[1] != pool_len:
        raise ValueError(f"req_to_token must be [num_reqs, {pool_len}], got {req_to_token.shape}")
    lengths = (end_offset - start_offset).to(torch.long)
    total = int(lengths.sum())
    if total == 0:
        return
    if out_cache_loc.numel() < total:
        raise ValueError(f"out_cache_loc has {out_cache_loc.numel()} slots, {total} needed")
    rows = torch.repeat_interleave(req_pool_indices.to(torch.long), lengths)
    seg_start = torch.cumsum(lengths, 0) - lengths  # where each request's slots begin
    within = torch.arange(total, device=lengths.device) - torch.repeat_interleave(
        seg_start, lengths
    )
    cols = torch.repeat_interleave(start_offset.to(torch.long), lengths) + within
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Copy KV-cache rows ``src_loc`` -> ``tgt_loc`` in every layer's buffer, in place.

    ``data_ptrs[l]`` is the address of layer l's buffer and ``strides[l]`` its row size in bytes
    (SGLang hands raw addresses, so the copy is a byte move, as the compiled kernel does).
    """
    pairs = list(zip(tgt_loc.tolist(), src_loc.tolist()))
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        for tgt, src in pairs:
            if tgt != src:
                ctypes.memmove(base + tgt * stride, base + src * stride, stride)


# Imported at module level by SGLang on CPU but only called by features a dense model on CPU does
# not use here (speculative decoding, MoE, Mamba, AMX attention): they fail loudly if ever called.
_UNSUPPORTED: tuple[str, ...] = (
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
)


def _unsupported(name: str) -> Callable[..., None]:
    def stub(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not implemented by hpt-megatron's CPU stand-in for SGLang"
        )

    stub.__name__ = name
    return stub


globals().update({name: _unsupported(name) for name in _UNSUPPORTED})


_HOST_POOL_MODULE = "sglang.srt.mem_cache.pool_host.common"


def _alloc_unpinned(
    dims: Any, dtype: torch.dtype, device: str, pin_memory: bool, allocator: Any, **_: Any
) -> torch.Tensor:
    """A host buffer from SGLang's allocator, not pinned (no GPU to copy to on a CPU server)."""
    return allocator.allocate(dims, dtype=dtype, device=device)


class _HostPoolFinder(importlib.abc.MetaPathFinder):
    """Once SGLang's host-pool module is imported, its device "cpu" allocator is
    :func:`_alloc_unpinned` (SGLang's default pins with ``cudaHostRegister``)."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != _HOST_POOL_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            module.ALLOC_MEMORY_FUNCS["cpu"] = _alloc_unpinned

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _plain_cpu_host_buffers() -> None:
    loaded = sys.modules.get(_HOST_POOL_MODULE)
    if loaded is not None:
        loaded.ALLOC_MEMORY_FUNCS["cpu"] = _alloc_unpinned
    elif not any(isinstance(f, _HostPoolFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _HostPoolFinder())


_plain_cpu_host_buffers()
