"""Weight sync by tensor handles: ``/update_weights_from_tensor`` with flattened buckets.

For colocated placement: the trainer's GPU tensors are not copied through HTTP; each bucket is
flattened into one byte tensor whose CUDA IPC handle (plus per-tensor metadata) is pickled with
``ForkingPickler`` and sent base64-encoded, once per server TP rank. The server maps the handle,
copies the weights in, and the trainer may free the bucket once the call returns.

Compatibility with SGLang 0.5.23's loader, written independently of its code:
- the pickle may only reference allow-listed globals (torch rebuild functions, torch types,
  ``types.SimpleNamespace``), so the per-tensor metadata travels as ``SimpleNamespace`` objects
  with the attributes SGLang's flattened-bucket loader reads;
- the server resolves a CUDA device given as a GPU UUID string (it may see the GPUs under
  different indices), so the device index in the IPC handle is replaced by the GPU's UUID.
CPU tensors travel through shared memory (torch's ``file_system`` strategy), which lets this
transport run on CPU too.
"""

from __future__ import annotations

import base64
import io
import threading
import types
from collections.abc import Iterable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
from torch.multiprocessing import get_sharing_strategy, reductions, set_sharing_strategy

from hpt_megatron.rollout.base import WeightBucket
from hpt_megatron.rollout.sglang.client import SGLangClient

_DEVICE_ARG = 6  # position of the device index in torch's rebuild_cuda_tensor arguments
_STRATEGY_LOCK = threading.Lock()
_ALIGN = 16  # bytes


def flatten_bucket(bucket: WeightBucket) -> tuple[torch.Tensor, list[types.SimpleNamespace]]:
    """Concatenate a bucket's tensors as bytes (each 16-byte aligned); metadata says where."""
    if not bucket:
        raise ValueError("cannot send an empty weight bucket")
    parts, meta, start = [], [], 0
    for name, tensor in bucket:
        flat = tensor.detach().contiguous().flatten().view(torch.uint8)
        pad = -start % _ALIGN  # the receiver views each slice as its dtype: keep it aligned
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=flat.device))
            start += pad
        meta.append(
            types.SimpleNamespace(
                name=name,
                shape=torch.Size(tensor.shape),
                dtype=tensor.dtype,
                start_idx=start,
                end_idx=start + flat.numel(),
                numel=flat.numel(),
            )
        )
        parts.append(flat)
        start += flat.numel()
    return torch.cat(parts), meta


class _Pickler(ForkingPickler):
    """ForkingPickler whose CUDA tensors carry their GPU's UUID instead of a device index."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            rebuild, args = reductions.reduce_tensor(obj)
            uuid = str(torch.cuda.get_device_properties(obj.device).uuid)
            return rebuild, (*args[:_DEVICE_ARG], uuid, *args[_DEVICE_ARG + 1 :])
        return NotImplemented


def serialize_for_sglang(obj: Any) -> str:
    """Pickle ``obj`` (tensors by handle, not by value) and base64-encode it for HTTP."""
    buf = io.BytesIO()
    with _STRATEGY_LOCK:
        previous = get_sharing_strategy()
        set_sharing_strategy("file_system")  # CPU tensors: shm names, readable by any process
        try:
            _Pickler(buf).dump(obj)
        finally:
            set_sharing_strategy(previous)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class TensorTransport:
    """Weight sync by ``/update_weights_from_tensor`` (colocated: same host, and GPUs when on GPU).

    Args:
        tp_size: tensor-parallel ranks per server (each receives the same handle).
    """

    name = "tensor"

    def __init__(self, tp_size: int) -> None:
        self.tp_size = tp_size
        self.last_timing: dict[str, float] = {}

    async def push(
        self, client: SGLangClient, buckets: Iterable[WeightBucket], version: int
    ) -> None:
        """Send every bucket to every server; the cache is flushed after the last one."""
        from hpt_megatron.rollout.sglang.weight_sync import weight_update_session

        pending: dict[str, Any] | None = None
        async with weight_update_session(client):
            for bucket in buckets:
                if pending is not None:
                    await self._send(client, pending, version, flush=False)
                flat, meta = flatten_bucket(bucket)
                # The flat tensor must stay alive until the servers have copied it: keep it here.
                pending = {"flat": flat, "meta": meta}
            if pending is None:
                raise ValueError("update_weights: no tensors given")
            await self._send(client, pending, version, flush=True)

    async def _send(
        self, client: SGLangClient, bucket: dict[str, Any], version: int, *, flush: bool
    ) -> None:
        payload = serialize_for_sglang(
            {"flattened_tensor": bucket["flat"], "metadata": bucket["meta"]}
        )
        body = {
            "serialized_named_tensors": [payload] * self.tp_size,
            "load_format": "flattened_bucket",
            "flush_cache": flush,
            "weight_version": str(version),
        }
        for answer in await client.post_all("/update_weights_from_tensor", body):
            if not (isinstance(answer, dict) and answer.get("success")):
                raise RuntimeError(f"update_weights_from_tensor failed: {answer}")

    async def resync(self, client: SGLangClient, index: int) -> None:
        """Tensor handles are gone after a sync: a restarted server waits for the next push."""
