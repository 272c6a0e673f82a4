"""``weight_sync: tensor``: SGLang's ``/update_weights_from_tensor`` for servers on the trainer's
host (colocated); the trainer side of the push is ``distributed_pusher.py``'s, without groups.

A payload carries handles to this process's memory, not the bytes: torch's own reductions give
CUDA IPC handles for GPU tensors and, for CPU tensors under the ``file_system`` sharing
strategy (set only while a payload is pickled), the name of a shared-memory file. The server
maps the same memory, copies it into its parameters and answers; the tensors are kept alive
until then. torch's default CPU strategy (``file_descriptor``) passes descriptors over a socket
that only a child process can connect to: SGLang 0.5.23 then fails in an unguarded unpickle and
the whole server goes down. So every payload is checked before it is sent (:func:`check_payload`):
its pickle may name only the rebuild functions and types below.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import pickletools
from collections.abc import Iterable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.multiprocessing as torch_mp
import torch.multiprocessing.reductions  # noqa: F401  (registers the tensor reductions)

from hpt_megatron.models.export import bucketed
from hpt_megatron.rollout.base import WeightBucket
from hpt_megatron.rollout.weight_sync.distributed import (
    DistributedTransport,
    SyncError,
    Target,
    post_each,
    validate_bucket,
)

if TYPE_CHECKING:
    from hpt_megatron.rollout.sglang.client import SGLangClient

_REDUCTIONS = "torch.multiprocessing.reductions"
# What a payload's pickle may name: torch's rebuild functions for shared CPU storage and CUDA
# IPC, and the types they rebuild (each allowed by SGLang 0.5.23's ``SafeUnpickler``). A
# descriptor-passing reduction (``rebuild_storage_fd``, ``resource_sharer.DupFd``) is refused.
ALLOWED_GLOBALS = frozenset(
    {
        (_REDUCTIONS, "rebuild_tensor"),
        (_REDUCTIONS, "rebuild_typed_storage"),
        (_REDUCTIONS, "rebuild_storage_filename"),
        (_REDUCTIONS, "rebuild_cuda_tensor"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "float32"),
        ("torch", "float16"),
        ("torch", "bfloat16"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "UntypedStorage"),
    }
)


@contextlib.contextmanager
def _file_system_sharing() -> Iterator[None]:
    """CPU storages shared by file name while the block runs (see the module docstring)."""
    before = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch_mp.set_sharing_strategy(before)


def pickled_globals(data: bytes) -> set[tuple[str, str]]:
    """The ``(module, name)`` pairs a pickle imports (``GLOBAL`` and ``STACK_GLOBAL``), read
    without unpickling it."""
    found: set[tuple[str, str]] = set()
    strings: list[str | None] = []  # what each op pushed, strings only (for STACK_GLOBAL)
    memo: dict[int, str | None] = {}
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            module, name = str(arg).split(" ", 1)
            found.add((module, name))
            strings.append(None)
        elif op.name == "STACK_GLOBAL":
            found.add((str(strings[-2]), str(strings[-1])))
            strings.append(None)
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings.append(str(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(cast(int, arg))] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(int(cast(int, arg))))
        elif op.name not in ("PROTO", "FRAME", "STOP", "MARK"):
            strings.append(None)
    return found


def check_payload(data: bytes, names: list[str]) -> None:
    """Raise ``ValueError`` naming the tensors unless ``data`` imports only
    :data:`ALLOWED_GLOBALS` (a payload SGLang would fail to unpickle takes its server down)."""
    refused = sorted(pickled_globals(data) - ALLOWED_GLOBALS)
    if refused:
        raise ValueError(
            f"weight sync (tensor): the payload of {_shown(names)} would make the server import "
            f"{['.'.join(g) for g in refused]}, which SGLang refuses (and goes down on); only "
            "shared-memory files (CPU) and CUDA IPC handles are sent"
        )


def _shown(names: list[str]) -> str:
    """The first few of ``names``, for a message."""
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def shareable(bucket: WeightBucket) -> WeightBucket:
    """``bucket`` with every CPU tensor copied into a fresh shared-memory file (the export may
    hand out views of the model's parameters, which must not move into shared memory); GPU
    tensors as they are (CUDA IPC shares their own memory)."""
    validate_bucket(bucket)
    out = []
    with _file_system_sharing():
        for name, tensor in bucket:
            if tensor.device.type == "cpu":
                tensor = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_().copy_(tensor)
            out.append((name, tensor.detach().contiguous()))
    return out


class _Pickler(ForkingPickler):
    """torch's reductions, with a CUDA tensor's device named by its UUID (SGLang maps it to its
    own device index: the trainer and the server may number the GPUs differently)."""

    def reducer_override(self, obj: object) -> Any:
        if isinstance(obj, torch.Tensor) and obj.is_cuda:  # CUDA only
            rebuild, args = torch.multiprocessing.reductions.reduce_tensor(obj)
            uuid = str(torch.cuda.get_device_properties(args[6]).uuid)
            return rebuild, (*args[:6], uuid, *args[7:])
        return NotImplemented


def serialize(bucket: WeightBucket) -> str:
    """One server TP rank's payload of ``bucket`` (a :func:`shareable` one), base64 as
    ``/update_weights_from_tensor`` takes it; checked (:func:`check_payload`)."""
    buffer = io.BytesIO()
    with _file_system_sharing():
        _Pickler(buffer).dump(list(bucket))
    data = buffer.getvalue()
    check_payload(data, [name for name, _ in bucket])
    return base64.b64encode(data).decode()


# The most CPU bytes copied into shared memory at a time: a bucket goes in parts of about this
# size (the export hands out views of the parameters, so each part is a copy; a 512 MiB bucket
# shared whole doubled the driver's memory growth during a push).
PART_BYTES = 64 << 20


def send(targets: list[Target], bucket: WeightBucket, version: int, timeout_s: float) -> None:
    """Load ``bucket`` into every target (one payload per server TP rank), the servers at once,
    in parts of about :data:`PART_BYTES`; :class:`SyncError` naming each server that refused
    and the part's tensors."""
    for part in bucketed(bucket, PART_BYTES):
        _send_part(targets, part, version, timeout_s)


def _send_part(targets: list[Target], bucket: WeightBucket, version: int, timeout_s: float) -> None:
    shared = shareable(bucket)  # kept alive until every server has answered
    payloads = [
        {
            "serialized_named_tensors": [serialize(shared) for _ in range(target.tp_size)],
            "flush_cache": True,
            "weight_version": str(version),
        }
        for target in targets
    ]
    failed = post_each(targets, "/update_weights_from_tensor", payloads, timeout_s)
    for target, _ in failed:  # (a server that refused unpickled nothing: release its shares)
        for _, tensor in shared * target.tp_size:
            if tensor.device.type == "cpu":
                tensor.untyped_storage()._shared_decref()
    del shared  # every server has answered: its copy is in its parameters
    if failed:
        shown = _shown([name for name, _ in bucket])
        raise SyncError(f"weight sync (tensor) of {shown}: " + "; ".join(str(e) for _, e in failed))


class TensorTransport(DistributedTransport):
    """The engine's side of ``weight_sync: tensor``: the sessions and the restarted servers,
    as under ``distributed`` (:class:`DistributedTransport`), with no groups to build or
    destroy. A restarted server is held out of generation until the next push: the weights
    live on the trainer ranks, which are busy while the driver generates."""

    name = "tensor"

    def __init__(self, timeout_s: float, tp_size: int = 1) -> None:
        super().__init__("", timeout_s, tp_size)

    async def forget_groups(self, client: SGLangClient, generation: int) -> None:
        """No groups."""

    async def push(
        self, client: SGLangClient, buckets: Iterable[WeightBucket], version: int
    ) -> None:
        """Buckets in this process's hands (the engine is the only exporter)."""
        targets = self.targets(client)[0]
        await self.session(client, targets, "/begin_weight_update")
        try:
            for bucket in buckets:
                await asyncio.to_thread(send, targets, bucket, version, self.timeout_s)
        finally:
            await self.session(client, targets, "/end_weight_update")
        self.loaded(client)
