"""Reading Megatron torch_dist checkpoints without building the model (``torch_dist.py`` writes
them).

:class:`TorchDistCheckpoint` reads any region of any key through PyTorch Distributed
Checkpoint's ``FileSystemReader`` and its resharding helper, so checkpoints written at any TP/PP
layout (the trainer's included) are read one layer of one parameter at a time;
:func:`iter_checkpoint_hf_tensors` streams a checkpoint's weights out under their HF names (the
converter's ``megatron-to-hf``).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from hpt_megatron.models.mapping import Dims, rule_for

if TYPE_CHECKING:
    from hpt_megatron.models.hf_config import HFModelConfig

_LAYERS = "decoder.layers."
_EXPERTS = ".mlp.experts.experts."  # Megatron's checkpoint key of the experts (global index axis)
_EXPERT_READ_BYTES = 64 * 1024**2
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


class _IntoTensor(DefaultLoadPlanner):
    """Where ``FileSystemReader.read_data`` puts what it reads: regions of one tensor.

    ``read_data`` calls only these two methods of its planner; the rest of DCP's load planning is
    done by :meth:`TorchDistCheckpoint.read` with ``create_read_items_for_chunk_list``.
    """

    def __init__(self, dest: torch.Tensor) -> None:
        super().__init__()
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
                record = io.BufferedReader(_FileSlice(f, info.offset, info.length))
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
    nothing: a writer can plan its files before the data arrives. The order: the embedding,
    then layer by layer (stacked keys, then per-layer ones), then the rest (final norm, output).

    Raises:
        ValueError: a model key without an HF mapping, or a layer (expert) count that is not
            the config's.
    """
    stream = _HFStream(ckpt, hf, dtype=dtype, meta=meta)
    tensors = stream.tensors
    stacked = [k for k in tensors if k.startswith(_LAYERS) and not k[len(_LAYERS)].isdigit()]
    indexed: dict[int, list[str]] = {}
    for key in tensors:
        match = re.match(r"decoder\.layers\.(\d+)\.", key)
        if match:
            indexed.setdefault(int(match[1]), []).append(key)
    _check_counts(ckpt.folder, tensors, stacked, indexed, hf)
    head = [k for k in ("embedding.word_embeddings.weight",) if k in tensors]
    per_layer = set(stacked).union(*indexed.values()) if indexed else set(stacked)
    tail = [k for k in tensors if k not in per_layer and k not in head]
    for key in head:
        yield from stream.convert(key, ckpt.read(key, meta=meta))
    for layer in range(hf.num_hidden_layers):
        for key in stacked:
            name = f"{_LAYERS}{layer}.{key[len(_LAYERS) :]}"
            yield from stream.layer_key(key, name, (layer,))
        for key in indexed.get(layer, []):
            yield from stream.layer_key(key, key, ())
    for key in tail:
        yield from stream.convert(key, ckpt.read(key, meta=meta))


def _check_counts(
    folder: Path,
    tensors: dict[str, TensorStorageMetadata],
    stacked: list[str],
    indexed: dict[int, list[str]],
    hf: HFModelConfig,
) -> None:
    """The stored layers and experts are the config's."""
    layers = hf.num_hidden_layers
    for key in stacked:
        if tensors[key].size[0] != layers:
            raise ValueError(
                f"{folder}: {key} has {tensors[key].size[0]} layers, config.json has {layers}"
            )
    if indexed and max(indexed) >= layers:
        raise ValueError(
            f"{folder}: layer {max(indexed)} is stored, config.json has {layers} layers"
        )
    for key in tensors:
        if _EXPERTS in key:
            experts = tensors[key].size[1 if key in stacked else 0]
            if experts != hf.num_experts:
                raise ValueError(
                    f"{folder}: {key} holds {experts} experts, config.json has "
                    f"num_experts={hf.num_experts}"
                )


class _HFStream:
    """Reads a checkpoint's model keys (``tensors``) region by region and maps each region to
    its HF tensors (``rule_for``), in ``dtype`` when given; with ``meta``, reading nothing."""

    def __init__(
        self, ckpt: TorchDistCheckpoint, hf: HFModelConfig, *, dtype: torch.dtype | None, meta: bool
    ) -> None:
        self.ckpt, self.hf, self.dtype, self.meta = ckpt, hf, dtype, meta
        self.dims = Dims.from_hf(hf)
        self.tensors = {k: md for k, md in ckpt.tensors().items() if k.startswith(_MODEL_PREFIXES)}

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The HF tensors of Megatron parameter ``name`` (none for one that is not exported)."""
        try:
            rule = rule_for(name, self.hf)
        except KeyError as err:
            raise ValueError(f"{self.ckpt.folder}: {err.args[0]}; unsupported checkpoint") from err
        if not rule.exported:
            return
        for hf_name, out in zip(rule.hf_names, rule.layout.to_hf([tensor], self.dims)):
            yield hf_name, out if self.dtype is None else out.to(self.dtype)

    def layer_key(
        self, key: str, name: str, lead: tuple[int, ...]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """One layer's tensor(s) of ``key`` (``lead``: the layer index in a stacked key)."""
        shape = tuple(self.tensors[key].size)
        if _EXPERTS in key:
            yield from self._experts(key, name, lead)
        elif lead:
            region = self.ckpt.read(
                key, lead + (0,) * (len(shape) - 1), (1,) + shape[1:], meta=self.meta
            )
            yield from self.convert(name, region[0])
        else:
            yield from self.convert(name, self.ckpt.read(key, meta=self.meta))

    def _experts(
        self, key: str, name: str, lead: tuple[int, ...]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Experts are read a group at a time (one DCP read per ~64 MiB, not one per expert: an
        expert's fc1 is two stored chunks, and a read has a fixed cost) and split in memory."""
        shape = tuple(self.tensors[key].size)
        n, inner = len(lead), shape[len(lead) + 1 :]
        itemsize = torch.empty((), dtype=self.tensors[key].properties.dtype).element_size()
        group = max(1, _EXPERT_READ_BYTES // max(1, torch.Size(inner).numel() * itemsize))
        for first in range(0, shape[n], group):
            count = min(group, shape[n] - first)
            start = lead + (first,) + (0,) * len(inner)
            region = self.ckpt.read(key, start, (1,) * n + (count,) + inner, meta=self.meta)
            region = region.reshape((count,) + inner)
            for i in range(count):
                expert_name = name.replace(_EXPERTS, f".mlp.experts.local_experts.{first + i}.")
                yield from self.convert(expert_name, region[i])
