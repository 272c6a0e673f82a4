"""Megatron torch_dist checkpoints of model weights, read and written without building the model.

The converter streams between HF safetensors and a torch_dist checkpoint one tensor at a time,
with PyTorch Distributed Checkpoint (DCP) doing the file format on both sides:

- **Writing** (:func:`write_checkpoint_from_hf`): the checkpoint's schema (keys, global shapes,
  chunk offsets, the per-layer ``_extra_state`` objects) comes from Megatron itself: the model is
  built on the ``meta`` device at TP=PP=1 (no memory) and its ``sharded_state_dict()`` lists what
  Megatron writes and what its loader asks for. A DCP save planner turns that schema into write
  items whose data it produces lazily from the HF tensors when the writer asks for it, so only one
  parameter is in memory at a time and DCP's ``FileSystemWriter`` writes the files.
- **Reading** (:class:`TorchDistCheckpoint`): any region of any key is read through DCP's
  ``FileSystemReader`` and its resharding helper, so checkpoints written at any TP/PP layout (the
  trainer's included) are read one layer of one parameter at a time.

The checkpoint holds the keys, global shapes, dtypes and chunks that Megatron's
``dist_checkpointing.save`` of the TP=PP=1 model writes (``metadata.json``, ``common.pt``, the DCP
index ``.metadata``), so it loads at any layout; its data files are one per chunk (DCP's
``single_file_per_rank=False``) rather than one per rank, so that a reader can map them.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.utils.serialization import config as serialization_config

from hpt_megatron.models.loading import check_expert_tensors, local_tensor
from hpt_megatron.models.mapping import Dims, rule_for, tp1_region

if TYPE_CHECKING:
    from hpt_megatron.models.hf_config import HFModelConfig

# What ``dist_checkpointing.save`` writes next to the DCP files (megatron-core 0.16).
MEGATRON_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
_LAYERS = "decoder.layers."
_EXPERTS = ".mlp.experts.experts."  # Megatron's checkpoint key of the experts (global index axis)
_EXPERT_READ_BYTES = 64 * 1024**2
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


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


def megatron_schema(hf: HFModelConfig, dtype: str) -> Schema:
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
            data = TensorWriteData(chunk=chunk, properties=properties, size=piece.global_shape)
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
    dtype: str,
    schema: Schema | None = None,
    progress: bool = False,
) -> int:
    """Write the HF checkpoint in ``hf_folder`` as a torch_dist checkpoint in ``out``.

    ``schema`` defaults to :func:`megatron_schema` of ``hf``, which needs Megatron's parallel
    state (a world of one). Returns the bytes of tensor data written.

    Raises:
        ValueError: a missing shard or tensor, or an HF shape that does not match the config.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from tqdm import tqdm

    from hpt_megatron.models.hf_io import HFCheckpointReader

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    reader = HFCheckpointReader(hf_folder)
    schema = schema or megatron_schema(hf, dtype)
    bar = tqdm(total=len(schema.pieces), desc="hf-to-megatron", unit="tensor", disable=not progress)
    dims = Dims.from_hf(hf)
    check_expert_tensors(reader, hf)
    shapes_only = _HeaderReader(reader)
    for piece in schema.pieces:  # every HF tensor present and of the right shape, before writing
        _piece_tensor(shapes_only, piece, schema, hf, dims)

    # DCP's writer threads call produce(); an exception in a thread other than the caller's would
    # only end that thread (and its chunks would be missing from the index), so every failure is
    # recorded here, stops the other threads' next chunks, and is raised after the save.
    errors: list[BaseException] = []
    workers: set[threading.Thread] = set()

    def produce(piece: Piece) -> torch.Tensor:
        workers.add(threading.current_thread())
        if errors:
            raise RuntimeError("stopped: writing another chunk failed")
        try:
            data = _piece_tensor(reader, piece, schema, hf, dims).to(torch_dtype)
        except BaseException as err:
            errors.append(err)
            raise
        bar.update()
        return data

    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # One file per chunk (DCP's other layout, read by Megatron as well): a reader can then map a
    # chunk's file (torch.load(mmap=True)) instead of copying it into memory. Two writer threads
    # (Megatron's default too) overlap reading the HF tensors with writing.
    writer = FileSystemWriter(out, single_file_per_rank=False, thread_count=2, sync_files=False)
    planner = _LazySavePlanner(schema, torch_dtype, produce)
    # torch.load never checks a record's zip CRC32, and computing it takes most of torch.save's
    # time (0.24 s against 0.06 s for 272 MiB here): leave it out of the records we write.
    crc = serialization_config.save.compute_crc32
    serialization_config.save.compute_crc32 = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        if errors:
            raise errors[0]
    except BaseException as err:
        errors.append(err)
        for thread in workers - {threading.current_thread()}:
            thread.join()  # its next chunk stops it
        if created:  # leave nothing half-written behind
            shutil.rmtree(out, ignore_errors=True)
        raise errors[0] from None
    finally:
        serialization_config.save.compute_crc32 = crc
    bar.close()
    torch.save({}, out / "common.pt")
    save_config(CheckpointingConfig(**MEGATRON_CONFIG), str(out))
    size = torch.empty((), dtype=torch_dtype).element_size()
    return sum(torch.Size(piece.shape).numel() for piece in schema.pieces) * size


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


class _IntoTensor:
    """Where ``FileSystemReader.read_data`` puts what it reads: regions of one tensor.

    ``read_data`` calls only these two methods of its planner; the rest of DCP's load planning is
    done by :meth:`TorchDistCheckpoint.read` with ``create_read_items_for_chunk_list``.
    """

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        region = self.dest
        for dim, (start, size) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            region = region.narrow(dim, start, size)
        return region

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """The data is already in place."""


class TorchDistCheckpoint:
    """Read regions of the tensors of a torch_dist checkpoint, whatever layout wrote it.

    Raises:
        ValueError: ``folder`` is not a Megatron torch_dist checkpoint.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        config_file = self.folder / "metadata.json"
        if not config_file.is_file():
            raise ValueError(
                f"{self.folder}: not a Megatron distributed checkpoint (no metadata.json)"
            )
        backend = json.loads(config_file.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{config_file}: sharded_backend {backend!r}; only torch_dist is read")
        if not (self.folder / ".metadata").is_file():
            raise ValueError(f"{self.folder}: the DCP index .metadata is missing")
        self._reader = FileSystemReader(self.folder)
        self.metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def tensors(self) -> dict[str, TensorStorageMetadata]:
        """Tensor keys and their global metadata (objects such as ``_extra_state`` left out)."""
        return {
            key: md
            for key, md in self.metadata.state_dict_metadata.items()
            if not isinstance(md, BytesStorageMetadata)
        }

    def read(
        self,
        key: str,
        offsets: tuple[int, ...] | None = None,
        sizes: tuple[int, ...] | None = None,
        *,
        meta: bool = False,
    ) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of tensor ``key`` (all of it by default);
        with ``meta`` an empty tensor of its shape and dtype on the meta device (no reading)."""
        md = self.metadata.state_dict_metadata[key]
        assert isinstance(md, TensorStorageMetadata), key
        offsets = offsets or (0,) * len(md.size)
        sizes = sizes or tuple(md.size)
        if meta:
            return torch.empty(sizes, dtype=md.properties.dtype, device="meta")
        wanted = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        if wanted in md.chunks:  # one stored chunk: take torch.load's tensor, DCP would copy it
            info = self._reader.storage_data[MetadataIndex(key, wanted.offsets)]
            if not getattr(info, "transform_descriptors", None):  # no extension (compression)
                return self._read_record(key, info, wanted.sizes)
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        items = create_read_items_for_chunk_list(key, md, [wanted])
        covered = sum(torch.Size(item.lengths).numel() for item in items)
        if covered != dest.numel():
            raise ValueError(f"{self.folder}: {key} region {offsets}+{sizes} is not fully stored")
        self._reader.read_data(LoadPlan(items), _IntoTensor(dest)).wait()
        return dest

    def _read_record(self, key: str, info: Any, sizes: torch.Size) -> torch.Tensor:
        path = self.folder / info.relative_path
        if info.offset == 0 and info.length == path.stat().st_size:  # a file of its own: map it
            tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with open(path, "rb") as f:
                record = _FileSlice(f, info.offset, info.length)
                tensor = torch.load(record, map_location="cpu", weights_only=True)
        if tensor.shape != sizes:
            raise ValueError(
                f"{self.folder}: a {key} chunk holds {list(tensor.shape)}, "
                f"the index says {list(sizes)}"
            )
        return tensor


class _FileSlice(io.RawIOBase):
    """``length`` bytes of ``f`` from ``offset``, as a seekable file: one torch.save record."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.length - self.pos)
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(view[:n])
        self.pos += got
        return got


def iter_checkpoint_hf_tensors(
    ckpt: TorchDistCheckpoint,
    hf: HFModelConfig,
    *,
    dtype: torch.dtype | None = None,
    meta: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for every model weight in ``ckpt``, one layer of one key (one
    expert of an expert key) at a time.

    Per-layer keys are either stacked (``decoder.layers.<name>``, a leading layer axis: dense
    models) or per layer (``decoder.layers.<i>.<name>``: Megatron's layout for models mixing
    dense and expert layers); expert keys (``mlp.experts.experts.*``) have an expert axis next.
    Keys outside the model (optimizer state, RNG objects of a training checkpoint) are skipped.
    With ``meta`` the same sequence of names, shapes and dtypes, on the meta device, reading
    nothing: a writer can plan its files before the data arrives.

    Raises:
        ValueError: a model key without an HF mapping, or a layer (expert) count that is not
            the config's.
    """
    dims = Dims.from_hf(hf)
    layers = hf.num_hidden_layers
    tensors = {k: md for k, md in ckpt.tensors().items() if k.startswith(_MODEL_PREFIXES)}
    stacked = [k for k in tensors if k.startswith(_LAYERS) and not k[len(_LAYERS)].isdigit()]
    indexed: dict[int, list[str]] = {}
    for key in tensors:
        match = re.match(r"decoder\.layers\.(\d+)\.", key)
        if match:
            indexed.setdefault(int(match[1]), []).append(key)
    for key in stacked:
        if tensors[key].size[0] != layers:
            raise ValueError(
                f"{ckpt.folder}: {key} has {tensors[key].size[0]} layers, config.json has {layers}"
            )
    if indexed and max(indexed) >= layers:
        raise ValueError(
            f"{ckpt.folder}: layer {max(indexed)} is stored, config.json has {layers} layers"
        )
    for key in tensors:
        if _EXPERTS in key:
            experts = tensors[key].size[1 if key in stacked else 0]
            if experts != hf.num_experts:
                raise ValueError(
                    f"{ckpt.folder}: {key} holds {experts} experts, config.json has "
                    f"num_experts={hf.num_experts}"
                )

    def convert(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            rule = rule_for(name, hf)
        except KeyError as err:
            raise ValueError(f"{ckpt.folder}: {err.args[0]}; unsupported checkpoint") from err
        if not rule.exported:
            return
        for hf_name, out in zip(rule.hf_names, rule.layout.to_hf([tensor], dims)):
            yield hf_name, out if dtype is None else out.to(dtype)

    def layer_key(key: str, name: str, lead: tuple[int, ...]) -> Iterator[tuple[str, torch.Tensor]]:
        """One layer's tensor(s) of ``key`` (``lead``: the layer index in a stacked key)."""
        shape = tuple(tensors[key].size)
        if _EXPERTS not in key:
            if lead:
                region = ckpt.read(key, lead + (0,) * (len(shape) - 1), (1,) + shape[1:], meta=meta)
                yield from convert(name, region[0])
            else:
                yield from convert(name, ckpt.read(key, meta=meta))
            return
        # Experts are read a group at a time (one DCP read per ~64 MiB, not one per expert: an
        # expert's fc1 is two stored chunks, and a read has a fixed cost) and split in memory.
        n, inner = len(lead), shape[len(lead) + 1 :]
        itemsize = torch.empty((), dtype=tensors[key].properties.dtype).element_size()
        group = max(1, _EXPERT_READ_BYTES // max(1, torch.Size(inner).numel() * itemsize))
        for first in range(0, shape[n], group):
            count = min(group, shape[n] - first)
            start = lead + (first,) + (0,) * len(inner)
            region = ckpt.read(key, start, (1,) * n + (count,) + inner, meta=meta)
            region = region.reshape((count,) + inner)
            for i in range(count):
                expert_name = name.replace(_EXPERTS, f".mlp.experts.local_experts.{first + i}.")
                yield from convert(expert_name, region[i])

    head = [k for k in ("embedding.word_embeddings.weight",) if k in tensors]
    per_layer = set(stacked).union(*indexed.values()) if indexed else set(stacked)
    tail = [k for k in tensors if k not in per_layer and k not in head]
    for key in head:
        yield from convert(key, ckpt.read(key, meta=meta))
    for layer in range(layers):
        for key in stacked:
            name = f"{_LAYERS}{layer}.{key[len(_LAYERS) :]}"
            yield from layer_key(key, name, (layer,))
        for key in indexed.get(layer, []):
            yield from layer_key(key, key, ())
    for key in tail:
        yield from convert(key, ckpt.read(key, meta=meta))
