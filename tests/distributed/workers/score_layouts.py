"""Load Megatron checkpoints at one TP/PP layout and score sequences; the writer prints JSON.

    torchrun ... score_layouts.py --tp 2 --pp 1 --input IN.jsonl CKPT_DIR [CKPT_DIR ...]

Prints ``{CKPT_DIR: [[logprobs...], ...]}`` once, on the last stage's TP rank 0 of DP rank 0.
"""

from __future__ import annotations

import argparse
import json

from hpt_megatron.config.sections import ModelConfig, ParallelConfig
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.score import read_sequences, score_sequences
from hpt_megatron.trainer.checkpoint_files import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert parallel (MoE models)")
    parser.add_argument("--etp", type=int, help="expert tensor parallel (default: --tp)")
    parser.add_argument("--vpp", type=int)
    parser.add_argument("--input", required=True)
    parser.add_argument("ckpts", nargs="+")
    args = parser.parse_args()
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp)
    ctx = init_distributed(parallel)
    seqs = read_sequences(args.input)
    results = {}
    for ckpt in args.ckpts:
        hf = load_hf_config(ckpt)
        chunks = build_model_chunks(
            hf, ModelConfig(inline=hf.to_dict()), parallel, pp_rank=ctx.pp_rank, init_weights=False
        )
        load_checkpoint(ckpt, chunks)
        results[ckpt] = score_sequences(
            chunks,
            seqs,
            vocab_size=hf.vocab_size,
            tp_group=ctx.tp_group if ctx.tp > 1 else None,
            batch_size=2,
        )
    if ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        print(json.dumps(results))
    shutdown_distributed()


if __name__ == "__main__":
    main()
