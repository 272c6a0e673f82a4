"""Reading and writing Hugging Face checkpoint folders, one tensor at a time."""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    from hpt_megatron.models.hf_config import HFModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Everything a run or a rollout server needs next to the weights, besides config.json.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


# A per-expert HF tensor, and where its data sits in the fused form transformers 5 keeps in
# memory (``experts.gate_up_proj`` ``[E, 2F, hidden]``: gate rows then up rows; ``down_proj``).
_PER_EXPERT = re.compile(
    r"(?P<base>.*\.mlp\.experts\.)(?P<e>\d+)\.(?P<part>gate|up|down)_proj\.weight$"
)


def fused_expert_slot(name: str) -> tuple[str, int, str] | None:
    """``(fused tensor name, expert, part)`` of a per-expert HF name (``part``: ``gate``, ``up``
    or ``down``), ``None`` for other names. ``gate`` / ``up`` are the first / second half of
    ``gate_up_proj[expert]``'s rows; ``down`` is ``down_proj[expert]``."""
    match = _PER_EXPERT.match(name)
    if match is None:
        return None
    part = match["part"]
    fused = match["base"] + ("down_proj" if part == "down" else "gate_up_proj")
    return fused, int(match["e"]), part


def fused_expert_view(fused: torch.Tensor, expert: int, part: str) -> torch.Tensor:
    """The per-expert tensor inside a fused expert tensor (a view)."""
    if part == "down":
        return fused[expert]
    rows = fused.shape[1] // 2
    return fused[expert, :rows] if part == "gate" else fused[expert, rows:]


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)``; a truncated or corrupt file is a ``ValueError`` naming it (not
    safetensors' own ``SafetensorError``)."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt (an "
            "interrupted download or copy?): fetch or export it again"
        ) from None


class HFCheckpointReader:
    """Lazily read tensors from ``model.safetensors`` or a sharded folder with an index.

    Experts are read per expert (``mlp.experts.{e}.gate_proj.weight``, what ``save_pretrained``
    writes) or, when the folder holds the fused form (``mlp.experts.gate_up_proj`` /
    ``mlp.experts.down_proj``, a transformers 5 state dict saved as is), cut from it under the
    per-expert names.

    Raises ``ValueError`` naming the folder and file for a missing index entry or shard.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            with open_safetensors(self.folder / SINGLE) as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise ValueError(f"{self.folder}: neither {INDEX} nor {SINGLE} found")
        for shard in sorted(set(self.weight_map.values())):
            if not (self.folder / shard).is_file():
                raise ValueError(f"{self.folder / INDEX}: shard {shard} is missing")
        self._headers: dict[str, tuple[list[int], str]] | None = None  # see get_meta

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or self._fused(name) is not None

    def _fused(self, name: str) -> tuple[str, int, str] | None:
        """``(fused tensor, expert, part)`` for a per-expert name stored fused, else ``None``."""
        slot = fused_expert_slot(name)
        if slot is None or name in self.weight_map or slot[0] not in self.weight_map:
            return None
        return slot

    def _check_expert(self, name: str, fused: str, expert: int) -> torch.Tensor:
        meta = self._stored_meta(fused)
        if meta.dim() != 3 or expert >= meta.shape[0]:
            raise ValueError(
                f"{self.folder}: {name!r} is not stored: the fused {fused} is "
                f"{list(meta.shape)} (experts first)"
            )
        return meta

    def get_meta(self, name: str) -> torch.Tensor:
        """An empty ``meta`` tensor with the stored shape and dtype (reads only the headers)."""
        fused = self._fused(name)
        if fused is not None:
            meta = self._check_expert(name, fused[0], fused[1])
            return fused_expert_view(meta, fused[1], fused[2])
        return self._stored_meta(name)

    def expert_counts(self) -> dict[int, int]:
        """Layer index -> how many experts the checkpoint stores for it (per-expert names, or
        the first dimension of the fused form)."""
        counts: dict[int, set[int] | int] = {}
        for name in self.weight_map:
            match = re.match(r".*layers\.(\d+)\.mlp\.experts\.(\d+)\.", name)
            if match:
                found = counts.setdefault(int(match[1]), set())
                assert isinstance(found, set)
                found.add(int(match[2]))
            match = re.match(r".*layers\.(\d+)\.mlp\.experts\.gate_up_proj$", name)
            if match:
                counts[int(match[1])] = int(self._stored_meta(name).shape[0])
        return {k: len(v) if isinstance(v, set) else v for k, v in counts.items()}

    def _stored_meta(self, name: str) -> torch.Tensor:
        if self._headers is None:
            self._headers = {}
            for shard in sorted(set(self.weight_map.values())):
                with open_safetensors(self.folder / shard) as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                        view = f.get_slice(key)
                        self._headers[key] = (view.get_shape(), view.get_dtype())
        if name not in self._headers:
            raise ValueError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        shape, dtype = self._headers[name]
        return torch.empty(shape, dtype=_TORCH_DTYPES[dtype], device="meta")

    def get(self, name: str) -> torch.Tensor:
        fused = self._fused(name)
        if fused is not None:
            fused_name, expert, part = fused
            meta = self._check_expert(name, fused_name, expert)
            with open_safetensors(self.folder / self.weight_map[fused_name]) as f:
                view = f.get_slice(fused_name)
                if part == "down":
                    data = view[expert]
                else:
                    rows = meta.shape[1] // 2
                    data = view[expert, :rows] if part == "gate" else view[expert, rows:]
            return data.contiguous()
        shard = self.weight_map.get(name)
        if shard is None:
            raise ValueError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        # Open per tensor: a kept-open handle keeps its memory map's touched pages resident,
        # which would grow the process by the whole checkpoint.
        with open_safetensors(self.folder / shard) as f:
            return f.get_tensor(name)


class HFCheckpointWriter:
    """Write buckets of ``(name, tensor)`` as safetensors shards, then the index."""

    def __init__(self, folder: str | Path, prefix: str = "model") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def write(self, bucket: Iterable[tuple[str, torch.Tensor]]) -> None:
        tensors = list(bucket)
        if tensors:
            entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors]
            self.write_stream(entries, iter(tensors))

    def write_stream(
        self,
        entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        tensors: Iterator[tuple[str, torch.Tensor]],
        shard: str | None = None,
    ) -> None:
        """One shard (named ``shard``, or ``<prefix>-NNNNN``) of tensors known before their data,
        taken from ``tensors`` one at a time (see :func:`write_safetensors_stream`)."""
        shard = shard or f"{self.prefix}-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        write_safetensors_stream(self.folder / shard, entries, tensors)
        for name, dtype, shape in entries:
            self.weight_map[name] = shard
            self.total_bytes += torch.Size(shape).numel() * dtype.itemsize

    def finish(self, others: Iterable[tuple[dict[str, str], int]] = ()) -> None:
        """Write the index, merging ``(weight_map, total_bytes)`` of other writers (pipeline
        stages that wrote their own shards into the same folder)."""
        write_index(self.folder, [(self.weight_map, self.total_bytes), *others])


def write_index(folder: str | Path, parts: Iterable[tuple[dict[str, str], int]]) -> None:
    """Write ``folder/model.safetensors.index.json`` from the ``(weight_map, total_bytes)`` of
    every writer whose shards are in ``folder``."""
    weight_map: dict[str, str] = {}
    total = 0
    for part_map, part_bytes in parts:
        weight_map.update(part_map)
        total += part_bytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX).write_text(json.dumps(index, indent=2) + "\n")


# safetensors' dtype names (its format spec).
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def write_safetensors_stream(
    path: str | Path,
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> None:
    """Write one safetensors file whose tensors are known (name, dtype, shape) before their data.

    The format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
    offsets), then the raw bytes. The header is written from ``entries``; then ``len(entries)``
    tensors are taken from ``tensors`` and written as each arrives, so only one is in memory at a
    time (``safetensors.torch.save_file`` needs them all at once) and views sharing a storage are
    fine. Each tensor must match its entry.

    Raises:
        ValueError: a repeated name, a dtype safetensors lacks, a tensor that does not match its
            entry, or ``tensors`` ending early.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        if name in header:
            raise ValueError(f"{path}: the tensor name {name!r} is repeated")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written as safetensors")
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format allows trailing spaces; align the data to 8
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            item = next(tensors, None)
            found = None if item is None else (item[0], item[1].dtype, tuple(item[1].shape))
            if item is None or found != (name, dtype, tuple(shape)):
                raise ValueError(f"{path}: expected {(name, dtype, shape)}, got {found}")
            flat = item[1].detach().cpu().contiguous().reshape(-1)
            if flat.numel():
                f.write(flat.view(torch.uint8).numpy().data)  # the bytes in place, no copy


def write_safetensors(path: str | Path, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Write ``(name, tensor)`` pairs as one safetensors file, streaming each tensor's bytes."""
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in bucket]
    write_safetensors_stream(path, entries, iter(bucket))


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer and generation files that exist in ``src``; return their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_config(hf: HFModelConfig, folder: str | Path, *, torch_dtype: str | None = None) -> None:
    """Write ``hf``'s fields as ``folder/config.json``, with ``torch_dtype`` (``"bfloat16"``...)
    when given (also as transformers 5's ``dtype`` if the file has that key)."""
    raw = hf.to_dict()
    if torch_dtype is not None:
        raw["torch_dtype"] = torch_dtype
        if "dtype" in raw:
            raw["dtype"] = torch_dtype
    (Path(folder) / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
