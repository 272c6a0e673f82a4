"""Load a Megatron checkpoint at one TP/PP layout, then write it back two ways.

    torchrun ... export_layouts.py --tp 2 --pp 1 --load CKPT --hf-out DIR --megatron-out DIR

``--hf-out``: the streaming HF export a run ends with (``models.export.save_hf_folder``).
``--megatron-out``: Megatron's own ``dist_checkpointing.save`` at this layout, whose chunks are the
TP shards, for the converter's reader to read back.
"""

from __future__ import annotations

import argparse

from hpt_megatron.config.sections import ModelConfig, ParallelConfig
from hpt_megatron.models.checkpoint import save_model_checkpoint
from hpt_megatron.models.export import save_hf_folder
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.checkpoint_files import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert parallel (MoE models)")
    parser.add_argument("--etp", type=int, help="expert tensor parallel (default: --tp)")
    parser.add_argument("--vpp", type=int)
    parser.add_argument("--load", required=True)
    parser.add_argument("--hf-out", required=True)
    parser.add_argument("--megatron-out", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp)
    ctx = init_distributed(parallel)
    hf = load_hf_config(args.load)
    model = ModelConfig(inline=hf.to_dict())
    chunks = build_model_chunks(hf, model, parallel, pp_rank=ctx.pp_rank, init_weights=False)
    load_checkpoint(args.load, chunks)
    save_hf_folder(chunks, hf, args.hf_out, ctx, torch_dtype="float32")
    save_model_checkpoint(chunks, args.megatron_out)
    shutdown_distributed()


if __name__ == "__main__":
    main()
