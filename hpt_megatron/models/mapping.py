"""HF <-> Megatron weight layout, one parameter at a time.

Each Megatron parameter name (with its *global* layer index) matches one :class:`Rule`: the HF
tensors it is made of and a :class:`Layout` that turns those HF tensors into this TP rank's shard
(import) and the TP ranks' shards back into the HF tensors (export). The layouts follow
docs/architecture.md (Contracts):

- ``linear_qkv``: ``[(H + 2G) * d, hidden]`` as G blocks ``[H/G query heads, 1 key, 1 value]``;
  TP ranks hold whole groups, so the TP shard is a contiguous slice of the blocks.
- ``linear_fc1``: ``[gate; up]`` on the full tensor, ``[gate_r; up_r]`` on TP rank r.
- embedding / output layer: vocabulary padded (with zeros) to the model's size, stripped on export.

Mixture-of-experts layers (models whose config has experts) add ``mlp.router.weight`` (HF's
``mlp.gate.weight``, replicated) and ``mlp.experts.local_experts.{e}.linear_fc{1,2}.weight``
(HF's per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``, the fc1 / row layouts below split
over the *expert* tensor-parallel group). In the names this module takes, ``e`` is the *global*
expert index (:func:`global_param_names` adds the expert-parallel rank's offset); such rules are
marked ``expert`` so that callers split and gather them over the expert TP group. transformers 5
keeps experts fused in memory (``mlp.experts.gate_up_proj`` ``[E, 2F, hidden]``,
``mlp.experts.down_proj`` ``[E, hidden, F]``) but saves them per expert; the fused form is read by
:class:`~hpt_megatron.models.hf_io.HFCheckpointReader`.

Shape legend: H query heads, G KV groups, d head dim, V vocab, Vp padded vocab, F ffn hidden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from hpt_megatron.models.hf_config import HFModelConfig


@dataclass(frozen=True)
class Dims:
    """The sizes the layouts need, from the HF config."""

    heads: int
    groups: int
    head_dim: int
    vocab: int

    @classmethod
    def from_hf(cls, hf: HFModelConfig) -> Dims:
        return cls(
            heads=hf.num_attention_heads,
            groups=hf.num_key_value_heads,
            head_dim=hf.head_dim,
            vocab=hf.vocab_size,
        )


class Layout(Protocol):
    def to_local(
        self, hf: list[torch.Tensor], rank: int, size: int, local_shape: torch.Size, dims: Dims
    ) -> torch.Tensor:
        """This TP rank's shard from the HF tensors."""
        ...

    def to_hf(self, shards: list[torch.Tensor], dims: Dims) -> list[torch.Tensor]:
        """The HF tensors from every TP rank's shard (in rank order)."""
        ...


class Replicated:
    def to_local(self, hf, rank, size, local_shape, dims):
        return hf[0]

    def to_hf(self, shards, dims):
        return [shards[0]]


@dataclass(frozen=True)
class Split:
    """A plain TP split along ``dim``: 0 for column-parallel, 1 for row-parallel."""

    dim: int

    def to_local(self, hf, rank, size, local_shape, dims):
        return hf[0].chunk(size, dim=self.dim)[rank]

    def to_hf(self, shards, dims):
        return [shards[0] if len(shards) == 1 else torch.cat(shards, dim=self.dim)]


class Vocab:
    """Vocabulary-parallel rows, padded with zeros to the model's padded vocabulary."""

    def to_local(self, hf, rank, size, local_shape, dims):
        rows = local_shape[0]
        start = rank * rows
        local = hf[0].new_empty(local_shape)
        stop = min(start + rows, hf[0].shape[0])
        kept = max(0, stop - start)
        if kept:
            local[:kept] = hf[0][start:stop]
        local[kept:].zero_()
        return local

    def to_hf(self, shards, dims):
        if len(shards) == 1:  # a view: the padding rows are the last ones
            return [shards[0][: dims.vocab]]
        rows = shards[0].shape[0]
        kept = [s[: max(0, min(rows, dims.vocab - r * rows))] for r, s in enumerate(shards)]
        return [torch.cat(kept, dim=0)]


class QKV:
    """q, k, v (weights ``[n*d, hidden]`` or biases ``[n*d]``) <-> grouped ``linear_qkv``."""

    def to_local(self, hf, rank, size, local_shape, dims):
        q, k, v = hf
        per_group = dims.heads // dims.groups
        tail = q.shape[1:]
        q = q.reshape(dims.groups, per_group * dims.head_dim, *tail)
        k = k.reshape(dims.groups, dims.head_dim, *tail)
        v = v.reshape(dims.groups, dims.head_dim, *tail)
        groups_per_rank = dims.groups // size
        sl = slice(rank * groups_per_rank, (rank + 1) * groups_per_rank)
        return torch.cat([q[sl], k[sl], v[sl]], dim=1).reshape(-1, *tail)

    def to_hf(self, shards, dims):
        full = torch.cat(shards, dim=0)
        per_group = dims.heads // dims.groups
        tail = full.shape[1:]
        blocks = full.reshape(dims.groups, (per_group + 2) * dims.head_dim, *tail)
        q, k, v = blocks.split([per_group * dims.head_dim, dims.head_dim, dims.head_dim], dim=1)
        return [t.reshape(-1, *tail).contiguous() for t in (q, k, v)]


class GateUp:
    """gate and up ``[F, hidden]`` <-> ``linear_fc1`` (``[gate_r; up_r]`` on TP rank r)."""

    def to_local(self, hf, rank, size, local_shape, dims):
        gate, up = hf
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)

    def to_hf(self, shards, dims):
        halves = [s.chunk(2, dim=0) for s in shards]
        if len(shards) == 1:  # views: the two halves are contiguous rows
            return list(halves[0])
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


def tp1_region(
    layout: Layout,
    hf: list[torch.Tensor],
    start: tuple[int, ...],
    shape: tuple[int, ...],
    full_shape: torch.Size,
    dims: Dims,
) -> torch.Tensor:
    """The region ``[start, start + shape)`` of the TP=1 Megatron tensor (``full_shape``) made of
    the HF tensors ``hf``.

    Megatron checkpoints ``linear_fc1`` as two chunks, the gate rows and the up rows: those are
    the HF tensors themselves, returned without copying. Other regions are cut from the whole.

    Raises:
        ValueError: the HF tensors do not make a tensor of ``full_shape``.
    """
    shape, full = tuple(shape), tuple(full_shape)
    if (
        isinstance(layout, GateUp)
        and full == (2 * shape[0], *shape[1:])
        and start in ((0,) * len(shape), (shape[0],) + (0,) * (len(shape) - 1))
        and all(tuple(t.shape) == shape for t in hf)
    ):
        return hf[0] if start[0] == 0 else hf[1]
    try:
        region = layout.to_local(hf, 0, 1, full_shape, dims)
    except RuntimeError as err:
        raise ValueError(f"HF shapes {[list(t.shape) for t in hf]} do not fit: {err}") from err
    if tuple(region.shape) != full:
        raise ValueError(
            f"HF shapes {[list(t.shape) for t in hf]} make {list(region.shape)}, not {list(full)}"
        )
    for dim, (begin, size) in enumerate(zip(start, shape)):
        if size != region.shape[dim]:
            region = region.narrow(dim, begin, size)
    return region


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter: its HF tensors (names) and how TP shards map to them."""

    hf_names: tuple[str, ...]
    layout: Layout
    exported: bool = True  # False for the tied output layer: HF stores no lm_head then
    expert: bool = False  # split over the expert tensor-parallel group, one expert per rule


_L = r"decoder\.layers\.(?P<i>\d+)\."
_H = "model.layers.{i}."
_REPL, _COL, _ROW = Replicated(), Split(0), Split(1)
# (Megatron name pattern, HF name templates, layout); local-spec and TE-spec norm names both.
_TABLE: list[tuple[str, tuple[str, ...], Layout]] = [
    (r"embedding\.word_embeddings\.weight", ("model.embed_tokens.weight",), Vocab()),
    (r"decoder\.final_layernorm\.weight", ("model.norm.weight",), _REPL),
    (_L + r"input_layernorm\.weight", (_H + "input_layernorm.weight",), _REPL),
    (
        _L + r"self_attention\.linear_qkv\.layer_norm_weight",
        (_H + "input_layernorm.weight",),
        _REPL,
    ),
    (
        _L + r"self_attention\.linear_qkv\.weight",
        tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"),
        QKV(),
    ),
    (
        _L + r"self_attention\.linear_qkv\.bias",
        tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"),
        QKV(),
    ),
    (_L + r"self_attention\.q_layernorm\.weight", (_H + "self_attn.q_norm.weight",), _REPL),
    (_L + r"self_attention\.k_layernorm\.weight", (_H + "self_attn.k_norm.weight",), _REPL),
    (_L + r"self_attention\.linear_proj\.weight", (_H + "self_attn.o_proj.weight",), _ROW),
    (_L + r"pre_mlp_layernorm\.weight", (_H + "post_attention_layernorm.weight",), _REPL),
    (_L + r"mlp\.linear_fc1\.layer_norm_weight", (_H + "post_attention_layernorm.weight",), _REPL),
    (
        _L + r"mlp\.linear_fc1\.weight",
        (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        GateUp(),
    ),
    (_L + r"mlp\.linear_fc2\.weight", (_H + "mlp.down_proj.weight",), _ROW),
]
_E = _L + r"mlp\.experts\.local_experts\.(?P<e>\d+)\."
_HE = _H + "mlp.experts.{e}."
# Mixture-of-experts layers: the router and the routed experts (global expert index e).
_MOE_TABLE: list[tuple[str, tuple[str, ...], Layout]] = [
    (_L + r"mlp\.router\.weight", (_H + "mlp.gate.weight",), _REPL),
    (_E + r"linear_fc1\.weight", (_HE + "gate_proj.weight", _HE + "up_proj.weight"), GateUp()),
    (_E + r"linear_fc2\.weight", (_HE + "down_proj.weight",), _ROW),
]
_COMPILED = [(re.compile(pattern + "$"), names, layout) for pattern, names, layout in _TABLE]
_MOE_COMPILED = [
    (re.compile(pattern + "$"), names, layout) for pattern, names, layout in _MOE_TABLE
]


def rule_for(name: str, hf: HFModelConfig) -> Rule:
    """The :class:`Rule` for a Megatron parameter name whose layer index is global.

    Raises:
        KeyError: no rule for this name (a module this mapping does not know).
    """
    if name == "output_layer.weight":
        if hf.tie_word_embeddings:
            # Only a later pipeline stage holds this copy of the embedding (Megatron keeps the
            # two in sync); HF has no separate lm_head to export.
            return Rule(("model.embed_tokens.weight",), Vocab(), exported=False)
        return Rule(("lm_head.weight",), Vocab())
    for pattern, names, layout in _COMPILED:
        match = pattern.match(name)
        if match:
            fields = match.groupdict()
            return Rule(tuple(n.format(**fields) for n in names), layout)
    for pattern, names, layout in _MOE_COMPILED if hf.is_moe else ():
        match = pattern.match(name)
        if match:
            fields = match.groupdict()
            expert = "e" in fields
            if expert and int(fields["e"]) >= hf.num_experts:
                raise KeyError(f"{name!r}: expert index past num_experts={hf.num_experts}")
            return Rule(tuple(n.format(**fields) for n in names), layout, expert=expert)
    raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def global_param_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Map a model chunk's parameter names to names with global layer and expert indices.

    Within a pipeline stage (or virtual chunk) ``decoder.layers.{j}`` counts from zero; each
    layer knows its global 1-based ``layer_number``. Within an expert-parallel rank
    ``local_experts.{k}`` counts from zero; the experts module's rank in its expert-parallel
    group gives the offset (as its own ``sharded_state_dict`` does).
    """
    decoder = getattr(chunk, "decoder", None)
    offsets = {}
    if decoder is not None:
        offsets = {str(j): str(layer.layer_number - 1) for j, layer in enumerate(decoder.layers)}
    expert_offsets = {}
    for module_name, module in chunk.named_modules():
        group = getattr(module, "ep_group", None)
        if hasattr(module, "local_experts") and group is not None:
            expert_offsets[module_name + ".local_experts."] = group.rank() * len(
                module.local_experts
            )
    out = {}
    for name, _ in chunk.named_parameters():
        global_name = name
        for prefix, offset in expert_offsets.items():
            if name.startswith(prefix):
                index, rest = name[len(prefix) :].split(".", 1)
                global_name = f"{prefix}{int(index) + offset}.{rest}"
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", global_name)
        out[name] = f"decoder.layers.{offsets[match[1]]}.{match[2]}" if match else global_name
    return out
