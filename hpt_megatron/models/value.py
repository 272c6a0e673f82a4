"""A value model: the policy's Megatron GPT with a one-output head in place of the vocabulary.

Shape legend: S sequence, B batch, H hidden size.

The head (``ValueHead``, a plain ``Linear(H, 1)`` replicated on every tensor-parallel rank)
takes the place of ``GPTModel.output_layer``, so the model's forward returns ``[B, S, 1]``
values through Megatron's own post-processing (final norm, then the head). Embeddings are never
tied to the head: the model is built with ``tie_word_embeddings`` off. With a zero head the
model's values start at 0 whatever the trunk.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hpt_megatron.config.sections import ModelConfig, ParallelConfig
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext


class ValueHead(torch.nn.Module):
    """``[S, B, H] -> [S, B, 1]``, called like Megatron's output layer (returns a pair)."""

    def __init__(self, hidden_size: int, sequence_parallel: bool, dtype: torch.dtype) -> None:
        super().__init__()
        # Named like the output layer it replaces (``output_layer.weight``), which Megatron's
        # checkpoint code expects of an untied language model.
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.sequence_parallel = sequence_parallel

    def forward(
        self,
        hidden_sbh: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, None]:
        del weight, runtime_gather_output  # a vocabulary output layer's arguments
        if self.sequence_parallel:
            from megatron.core import tensor_parallel

            # Sequence-parallel ranks hold slices of S; the head needs every position.
            hidden_sbh = tensor_parallel.gather_from_sequence_parallel_region(hidden_sbh)
        return torch.nn.functional.linear(hidden_sbh, self.weight, self.bias), None


def build_value_chunks(
    hf: HFModelConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pp_rank: int,
    init_weights: bool = True,
) -> list[torch.nn.Module]:
    """This pipeline rank's value-model chunks (the last one ends in a :class:`ValueHead`)."""
    from hpt_megatron.models.provider import build_model_chunks

    untied = dataclasses.replace(hf, tie_word_embeddings=False)
    chunks = build_model_chunks(untied, model, parallel, pp_rank=pp_rank, init_weights=init_weights)
    last = chunks[-1]
    if last.post_process:
        config = last.config
        head = ValueHead(config.hidden_size, config.sequence_parallel, config.params_dtype)
        last.output_layer = head.to(next(last.parameters()).device)
    return chunks


def iter_value_hf_tensors(
    chunks: list[torch.nn.Module],
    hf: HFModelConfig,
    *,
    tp_group: torch.distributed.ProcessGroup | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full_tensor)`` of a value model in the layout of HF's
    ``*ForTokenClassification`` with one label (``model.*`` trunk, ``score.weight`` /
    ``score.bias`` head), on TP rank 0 of each pipeline stage. Every TP rank must exhaust it."""
    from hpt_megatron.models.export import _gather_tp
    from hpt_megatron.models.mapping import Dims, global_param_names, rule_for

    untied = dataclasses.replace(hf, tie_word_embeddings=False)
    dims = Dims.from_hf(untied)
    for chunk in chunks:
        names = global_param_names(chunk)
        for local_name, param in chunk.named_parameters():
            if local_name.startswith("output_layer."):  # replicated: TP rank 0's copy
                shards = _gather_tp(param.detach(), tp_group)
                if shards is not None:
                    yield "score." + local_name.removeprefix("output_layer."), shards[0]
                continue
            rule = rule_for(names[local_name], untied)
            shards = _gather_tp(param.detach(), tp_group)
            if shards is None:
                continue
            yield from zip(rule.hf_names, rule.layout.to_hf(shards, dims))


def value_hf_config(hf: HFModelConfig) -> dict[str, Any]:
    """``config.json`` of the exported value model: HF's ``*ForTokenClassification``, 1 label."""
    raw = hf.to_dict()
    arch = raw.get("architectures") or ["LlamaForCausalLM"]
    raw["architectures"] = [arch[0].replace("ForCausalLM", "ForTokenClassification")]
    raw.update(tie_word_embeddings=False, num_labels=1, id2label={"0": "VALUE"})
    raw["label2id"] = {"VALUE": 0}
    return raw


def save_value_hf_folder(
    chunks: list[torch.nn.Module],
    hf: HFModelConfig,
    out: str | Path,
    ctx: ParallelContext,
    *,
    torch_dtype: str,
) -> None:
    """Collective: the value model as an HF folder that ``AutoModelForTokenClassification``
    loads (one label: the value of each position). Layout as ``models.export.save_hf_folder``."""
    from hpt_megatron.models.export import DEFAULT_BUCKET_BYTES, bucketed
    from hpt_megatron.models.hf_io import HFCheckpointWriter

    writer = None
    if ctx.dp_rank == 0:  # other replicas hold the same weights
        if ctx.tp_rank == 0:
            prefix = "model" if ctx.pp == 1 else f"model-pp{ctx.pp_rank}"
            writer = HFCheckpointWriter(out, prefix=prefix)
        tp_group = ctx.tp_group if ctx.tp > 1 else None
        tensors = iter_value_hf_tensors(chunks, hf, tp_group=tp_group)
        for bucket in bucketed(tensors, DEFAULT_BUCKET_BYTES):
            if writer is not None:
                writer.write(bucket)
    mine = (writer.weight_map, writer.total_bytes) if writer is not None else None
    parts: list[Any] = [mine]
    if ctx.world_size > 1:
        parts = [None] * ctx.world_size
        torch.distributed.all_gather_object(parts, mine, group=ctx.cpu_group)
    if ctx.is_driver:
        assert writer is not None  # rank 0 is TP, PP and DP rank 0
        writer.finish(p for i, p in enumerate(parts) if p is not None and i != ctx.rank)
        raw = {**value_hf_config(hf), "torch_dtype": torch_dtype}
        (Path(out) / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
