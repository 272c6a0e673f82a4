"""Megatron torch_dist checkpoints of model weights, read and written without building the model.

The converter streams between HF safetensors and a torch_dist checkpoint one tensor at a time,
with PyTorch Distributed Checkpoint (DCP) doing the file format on both sides:

- **Writing** (:func:`write_checkpoint_from_hf`): the checkpoint's schema (keys, global shapes,
  chunk offsets, the per-layer ``_extra_state`` objects) comes from Megatron itself: the model is
  built on the ``meta`` device at TP=PP=1 (no memory) and its ``sharded_state_dict()`` lists what
  Megatron writes and what its loader asks for. A DCP save planner turns that schema into write
  items whose data it produces lazily from the HF tensors when the writer asks for it, so only one
  parameter is in memory at a time and DCP's ``FileSystemWriter`` writes the files.
- **Reading** (``torch_dist_reader.py``: :class:`TorchDistCheckpoint`): any region of any key is
  read through DCP's ``FileSystemReader`` and its resharding helper, so checkpoints written at any
  TP/PP layout (the trainer's included) are read one layer of one parameter at a time.

The checkpoint holds the keys, global shapes, dtypes and chunks that Megatron's
``dist_checkpointing.save`` of the TP=PP=1 model writes (``metadata.json``, ``common.pt``, the DCP
index ``.metadata``), so it loads at any layout; its data files are one per chunk (DCP's
``single_file_per_rank=False``) rather than one per rank, so that a reader can map them.
"""

from __future__ import annotations

import io
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.utils.serialization import config as serialization_config

from hpt_megatron.models.loading import check_expert_tensors, local_tensor
from hpt_megatron.models.mapping import Dims, rule_for, tp1_region

if TYPE_CHECKING:
    from hpt_megatron.config.sections import ParamsDtype
    from hpt_megatron.models.hf_config import HFModelConfig

# What ``dist_checkpointing.save`` writes next to the DCP files (megatron-core 0.16).
MEGATRON_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Piece:
    """One chunk Megatron writes: a region of a parameter of the TP=PP=1 model.

    ``param`` is the parameter's name (global layer index), ``start`` its offset inside that
    parameter along each of the parameter's own dimensions, ``shape`` the region's shape.
    """

    key: str
    param: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]  # in the global tensor, the layer axis included
    start: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Schema:
    pieces: list[Piece]
    objects: dict[str, Any]  # ShardedObject unique key -> its data
    params: dict[str, torch.Tensor]  # parameter name -> meta tensor (shape, for checks)


def megatron_schema(hf: HFModelConfig, dtype: ParamsDtype) -> Schema:
    """What Megatron writes for the TP=PP=1 model of ``hf``, from a model built on ``meta``
    with local layers (GPU or not: TE layers would add FP8 state objects a CPU run lacks).

    Needs Megatron's parallel state (a world of one is enough).
    """
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        apply_factories,
    )

    from hpt_megatron.config.sections import ModelConfig, ParallelConfig
    from hpt_megatron.models.checkpoint import model_sharded_state_dict
    from hpt_megatron.models.provider import build_model_chunks

    model = ModelConfig(inline=hf.to_dict(), params_dtype=dtype)
    chunks = build_model_chunks(
        hf, model, ParallelConfig(), pp_rank=0, init_weights=False, meta=True
    )
    params = dict(chunks[0].named_parameters())
    sharded = model_sharded_state_dict(chunks)
    apply_factories(sharded)
    pieces, objects = [], {}
    for name, value in sharded["model"].items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, ShardedObject):
                objects[item.unique_key] = item.data
                continue
            assert isinstance(item, ShardedTensor), (name, type(item))
            n = item.prepend_axis_num
            pieces.append(
                Piece(
                    key=item.key,
                    param=name,
                    global_shape=tuple(item.global_shape),
                    offsets=tuple(item.global_offset),
                    start=tuple(item.global_offset[n:]),
                    shape=tuple(item.local_shape),
                )
            )
    return Schema(pieces=pieces, objects=objects, params=params)


class _LazySavePlanner(DefaultSavePlanner):
    """Write items from a :class:`Schema`; their tensors come from ``produce`` when written."""

    def __init__(
        self, schema: Schema, dtype: torch.dtype, produce: Callable[[Piece], torch.Tensor]
    ) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.schema, self.dtype, self.produce = schema, dtype, produce
        self.by_index: dict[MetadataIndex, Piece] = {}

    def create_local_plan(self) -> SavePlan:
        items = []
        for key in self.schema.objects:
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        properties = TensorProperties(dtype=self.dtype)
        for piece in self.schema.pieces:
            index = MetadataIndex(piece.key, piece.offsets)
            n = len(piece.offsets) - len(piece.shape)
            chunk = ChunkStorageMetadata(
                offsets=torch.Size(piece.offsets), sizes=torch.Size((1,) * n + piece.shape)
            )
            size = torch.Size(piece.global_shape)
            data = TensorWriteData(chunk=chunk, properties=properties, size=size)
            items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data))
            self.by_index[index] = piece
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            # Megatron serialises a ShardedObject as torch.save([data]).
            buffer = io.BytesIO()
            torch.save([self.schema.objects[write_item.index.fqn]], buffer)
            buffer.seek(0)
            return buffer
        piece = self.by_index[write_item.index]
        n = len(piece.offsets) - len(piece.shape)
        return self.produce(piece).reshape((1,) * n + piece.shape)


def write_checkpoint_from_hf(
    hf: HFModelConfig,
    hf_folder: str | Path,
    out: str | Path,
    *,
    dtype: ParamsDtype,
    schema: Schema | None = None,
    progress: bool = False,
) -> int:
    """Write the HF checkpoint in ``hf_folder`` as a torch_dist checkpoint in ``out``.

    ``schema`` defaults to :func:`megatron_schema` of ``hf``, which needs Megatron's parallel
    state (a world of one). Every HF tensor is checked (present, of the right shape) before
    anything is written. Returns the bytes of tensor data written.

    Raises:
        ValueError: a missing shard or tensor, or an HF shape that does not match the config.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from tqdm import tqdm

    from hpt_megatron.models.hf_io import HFCheckpointReader

    torch_dtype = _TORCH_DTYPES[dtype]
    reader = HFCheckpointReader(hf_folder)
    schema = schema or megatron_schema(hf, dtype)
    bar = tqdm(total=len(schema.pieces), desc="hf-to-megatron", unit="tensor", disable=not progress)
    dims = Dims.from_hf(hf)
    check_expert_tensors(reader, hf)
    shapes_only = _HeaderReader(reader)
    for piece in schema.pieces:
        _piece_tensor(shapes_only, piece, schema, hf, dims)
    producer = _Producer(
        lambda piece: _piece_tensor(reader, piece, schema, hf, dims).to(torch_dtype), bar.update
    )
    out = Path(out)
    _save(out, _LazySavePlanner(schema, torch_dtype, producer), producer)
    bar.close()
    torch.save({}, out / "common.pt")
    save_config(CheckpointingConfig(**MEGATRON_CONFIG), str(out))
    size = torch.empty((), dtype=torch_dtype).element_size()
    return sum(torch.Size(piece.shape).numel() for piece in schema.pieces) * size


class _Producer:
    """The tensors of the chunks, made when DCP's writer threads ask for them.

    An exception in a thread other than the caller's would only end that thread (and its chunks
    would be missing from the index), so every failure is recorded in ``errors``, stops the other
    threads' next chunks, and is raised after the save (:func:`_save`).
    """

    def __init__(self, make: Callable[[Piece], torch.Tensor], done: Callable[[], Any]) -> None:
        self.make, self.done = make, done
        self.errors: list[BaseException] = []
        self.workers: set[threading.Thread] = set()

    def __call__(self, piece: Piece) -> torch.Tensor:
        self.workers.add(threading.current_thread())
        if self.errors:
            raise RuntimeError("stopped: writing another chunk failed")
        try:
            data = self.make(piece)
        except BaseException as err:
            self.errors.append(err)
            raise
        self.done()
        return data


def _save(out: Path, planner: _LazySavePlanner, producer: _Producer) -> None:
    """DCP's save of ``planner``'s items into ``out``; on any failure (a writer thread's included)
    a folder this call created is removed and the first error raised."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # One file per chunk (DCP's other layout, read by Megatron as well): a reader can then map a
    # chunk's file (torch.load(mmap=True)) instead of copying it into memory. Two writer threads
    # (Megatron's default too) overlap reading the HF tensors with writing.
    writer = FileSystemWriter(out, single_file_per_rank=False, thread_count=2, sync_files=False)
    # torch.load never checks a record's zip CRC32, and computing it takes most of torch.save's
    # time (0.24 s against 0.06 s for 272 MiB here): leave it out of the records we write.
    crc = serialization_config.save.compute_crc32
    serialization_config.save.compute_crc32 = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        if producer.errors:
            raise producer.errors[0]
    except BaseException as err:
        producer.errors.append(err)
        for thread in producer.workers - {threading.current_thread()}:
            thread.join()  # its next chunk stops it
        if created:  # leave nothing half-written behind
            shutil.rmtree(out, ignore_errors=True)
        raise producer.errors[0] from None
    finally:
        serialization_config.save.compute_crc32 = crc


def _piece_tensor(
    reader: Any, piece: Piece, schema: Schema, hf: HFModelConfig, dims: Dims
) -> torch.Tensor:
    """The data of one chunk, from the HF tensors ``reader.get`` returns (meta ones for checks)."""
    meta = schema.params[piece.param]
    if piece.shape == tuple(meta.shape):
        return local_tensor(reader, piece.param, meta, hf, tp_rank=0, tp_size=1)
    # One of several chunks of the parameter (linear_fc1's gate and up rows).
    rule = rule_for(piece.param, hf)
    sources = [reader.get(name) for name in rule.hf_names]
    try:
        return tp1_region(rule.layout, sources, piece.start, piece.shape, meta.shape, dims)
    except ValueError as err:
        raise ValueError(f"{reader.folder}: {piece.param}: {err}") from err


class _HeaderReader:
    """An :class:`HFCheckpointReader` whose tensors are meta tensors of the stored shapes."""

    def __init__(self, reader: Any) -> None:
        self.folder, self._reader = reader.folder, reader

    def get(self, name: str) -> torch.Tensor:
        return self._reader.get_meta(name)
