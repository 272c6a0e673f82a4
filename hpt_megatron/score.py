"""Score token sequences with a Megatron checkpoint: per-token log-probabilities, on CPU or GPU.

    torchrun --nproc_per_node N -m hpt_megatron.score --load MEGATRON_DIR --tp T --pp P --ep E \
        --input IN.jsonl --output OUT.jsonl

Each input line is ``{"input_ids": [...]}``; each output line is ``{"logprobs": [...]}``, the
log-probability of every token after the first given the tokens before it. The forward pass is
Megatron's pipeline schedule (``forward_only=True``, any PP); the log-probs come from the final
hidden states through the vocabulary-parallel output layer fused with the log-softmax, in fp32
(``parallel.logprobs.output_logprobs_entropy``, the training path's), so no rank gathers the
vocabulary or holds the logits. Padded vocabulary rows are left out of the softmax.
Data-parallel replicas (world > TP*PP) split the sequences. Works as a plain ``python -m`` (one
process) too.

Shape legend: b micro-batch (1), s sequence, h hidden size.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hpt_megatron.parallel.logprobs import final_hidden_states, output_logprobs_entropy

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel


def read_sequences(path: str | Path) -> list[list[int]]:
    """Token id lists from a JSONL file; ``ValueError`` naming the file and line."""
    seqs = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)["input_ids"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f'{path}:{lineno}: expected {{"input_ids": [...]}} ({err})') from err
        if len(ids) < 1 or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"{path}:{lineno}: input_ids must be a non-empty list of ints")
        seqs.append(ids)
    return seqs


def _batches(seqs: Sequence[list[int]], multiple: int) -> Iterator[dict[str, torch.Tensor]]:
    length = max(len(s) for s in seqs)
    length = -(-length // multiple) * multiple
    for seq in seqs:
        tokens = torch.zeros(1, length, dtype=torch.long)
        tokens[0, : len(seq)] = torch.tensor(seq)
        labels = torch.zeros_like(tokens)
        labels[0, : len(seq) - 1] = tokens[0, 1 : len(seq)]
        yield {"tokens": tokens, "labels": labels, "n": torch.tensor(len(seq))}


def _forward_step(
    data: Iterator[dict[str, torch.Tensor]],
    model: torch.nn.Module,
    *,
    vocab_size: int,
    tp_group: Any,
    device: torch.device,
) -> tuple[torch.Tensor, Any]:
    batch = {k: v.to(device) for k, v in next(data).items()}
    tokens = batch["tokens"]
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0)
    # Right padding under a causal mask leaves the real tokens' outputs untouched.
    with final_hidden_states(model):
        output = model(tokens, positions, None)

    def loss_func(hidden_sbh: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs_bs, _ = output_logprobs_entropy(
            model, hidden_sbh, batch["labels"], tp_group=tp_group, vocab_size=vocab_size
        )
        kept = logprobs_bs[0, : int(batch["n"]) - 1].detach().cpu()
        return logprobs_bs.sum() * 0.0, {"logprobs": kept}

    return output, loss_func


def score_sequences(
    chunks: list[GPTModel],
    seqs: Sequence[list[int]],
    *,
    vocab_size: int,
    tp_group: Any = None,
    seq_multiple: int = 1,
    batch_size: int = 16,
    device: torch.device | None = None,
) -> list[list[float]] | None:
    """Log-probs of every token after the first, per sequence; ``None`` except on the last stage.

    Sequences go through the pipeline ``batch_size`` at a time, each a micro-batch of one,
    right-padded to the longest of their batch (rounded up to ``seq_multiple``, e.g. TP with
    sequence parallelism).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = device or torch.device("cpu")
    step = partial(_forward_step, vocab_size=vocab_size, tp_group=tp_group, device=device)
    results: list[list[float]] = []
    is_last = False
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        # Megatron's interleaved (virtual pipeline) schedule needs at least PP micro-batches: pad a
        # short pass with copies of its last sequence and drop their results.
        min_batch = chunks[0].config.pipeline_model_parallel_size if len(chunks) > 1 else 1
        for start in range(0, len(seqs), batch_size):
            real = seqs[start : start + batch_size]
            batch = list(real) + [real[-1]] * max(0, min_batch - len(real))
            data = [_batches(batch, seq_multiple) for _ in chunks]  # one per virtual stage
            length = -(-max(len(s) for s in batch) // seq_multiple) * seq_multiple
            out = get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=data if len(chunks) > 1 else data[0],
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(batch),
                seq_length=length,
                micro_batch_size=1,
                forward_only=True,
            )
            if out:
                is_last = True
                results.extend(item["logprobs"].tolist() for item in out[: len(real)])
    return results if is_last else None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hpt_megatron.score", description=__doc__)
    parser.add_argument("--load", required=True, help="Megatron checkpoint (from tools/convert.py)")
    parser.add_argument("--hf-config", help="HF config folder (default: the checkpoint's)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert parallel (MoE models)")
    parser.add_argument("--etp", type=int, help="expert tensor parallel (default: --tp)")
    parser.add_argument("--vpp", type=int, help="virtual pipeline stages per PP rank")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per pipeline pass")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    import torch.distributed as dist

    from hpt_megatron.config.sections import ModelConfig, ParallelConfig
    from hpt_megatron.models.provider import build_model_chunks, load_hf_config
    from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
    from hpt_megatron.trainer.checkpoint_files import load_checkpoint

    args = _parse(argv)
    hf = load_hf_config(args.hf_config or args.load)
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp)
    parallel.validate()
    seqs = read_sequences(args.input)
    ctx = init_distributed(parallel)
    model = ModelConfig(inline=hf.to_dict(), params_dtype=args.dtype)
    chunks = build_model_chunks(hf, model, parallel, pp_rank=ctx.pp_rank, init_weights=False)
    load_checkpoint(args.load, chunks)
    mine = list(range(ctx.dp_rank, len(seqs), ctx.dp))
    # Expert parallelism spans data-parallel ranks and every forward pass exchanges tokens over
    # them: each rank scores as many sequences (a copy of the first one pads, and is dropped).
    count = -(-len(seqs) // ctx.dp) if parallel.ep > 1 else len(mine)
    padded = [seqs[i] for i in mine] + [seqs[0]] * (count - len(mine))
    scored = score_sequences(
        chunks,
        padded,
        vocab_size=hf.vocab_size,
        tp_group=ctx.tp_group if ctx.tp > 1 else None,
        seq_multiple=ctx.tp if parallel.sequence_parallel else 1,
        batch_size=args.batch_size,
        device=ctx.device,
    )
    scored = scored[: len(mine)] if scored is not None else None
    keep = scored is not None and ctx.tp_rank == 0
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, (mine, scored) if keep else None, group=ctx.cpu_group)
    if ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        out: list[list[float] | None] = [None] * len(seqs)
        for item in gathered:
            if item is not None:
                for index, logprobs in zip(*item):
                    out[index] = logprobs
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w") as f:
            for logprobs in out:
                f.write(json.dumps({"logprobs": logprobs}) + "\n")
    shutdown_distributed()


if __name__ == "__main__":
    main()
