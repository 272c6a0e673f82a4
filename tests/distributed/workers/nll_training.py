"""Worker: train a tiny model for a few dozen steps of token-mean NLL on one fixed batch.

Writes JSON (rank 0): the loss and gradient norm of every step, whether any update was skipped,
and the names of parameters that did not change.
"""

import argparse
import json

import torch
from nll_loss import TokenMeanNLL
from train_parity import ARCHS, make_samples

from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.batching import collate, token_budget_microbatches
from hpt_megatron.trainer.build import build_engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    parallel = ParallelConfig(tp=args.tp, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    hf = load_hf_config(ARCHS[args.arch])
    model_cfg = ModelConfig(inline=ARCHS[args.arch])
    # Clipping on: the CPU gradient clip is part of what this exercises.
    trainer_cfg = TrainerConfig(lr=1e-3, grad_clip=1.0, max_tokens_per_microbatch=64)

    chunks = build_model_chunks(hf, model_cfg, parallel, pp_rank=ctx.pp_rank)
    engine = build_engine(chunks, ctx, trainer_cfg, total_steps=args.steps)
    samples = make_samples()
    total_tokens = sum(len(s.response_ids) for s in samples)
    mine = [i for i in range(len(samples)) if i % ctx.dp == ctx.dp_rank]
    lengths = [samples[i].num_tokens for i in mine]
    batches = [
        collate(samples, [mine[j] for j in group], pad_to_multiple=args.tp)
        for group in token_budget_microbatches(lengths, trainer_cfg.max_tokens_per_microbatch)
    ]
    params = {n: p for chunk in engine.model_chunks for n, p in chunk.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}

    losses, norms, skipped = [], [], []
    for _ in range(args.steps):
        result = engine.train_step(batches, TokenMeanNLL(total_tokens))
        losses.append(result.metrics["nll_sum"] / result.metrics["tokens"])
        norms.append(result.grad_norm)
        skipped.append(result.skipped)
    unchanged = [n for n, p in params.items() if torch.equal(p.detach(), before[n])]

    gathered = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, unchanged, group=ctx.cpu_group)
    if ctx.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(
                {
                    "losses": losses,
                    "grad_norms": norms,
                    "skipped": skipped,
                    "unchanged": sorted({n for names in gathered for n in names}),
                    "num_params": len(params),
                    "num_microbatches": len(batches),
                },
                fh,
            )
    shutdown_distributed()


if __name__ == "__main__":
    main()
