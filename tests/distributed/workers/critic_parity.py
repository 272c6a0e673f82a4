"""Worker: the critic at a given TP/PP: values of a fixed batch, one clipped-value-loss update.

Writes JSON (rank 0): the values of every sample's response tokens before the update, the loss,
the gradient norm and the values after. ``--save`` (one process) creates the checkpoint (random
trunk, random head) and, with ``--hf``, also writes the critic as an HF token-classification
folder (``AutoModelForTokenClassification``) for the plain torch comparison.
"""

import argparse
import json
import math

import torch
from train_parity import ARCHS, make_samples

from hpt_megatron.config.algorithm import CriticConfig
from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.models.provider import load_hf_config
from hpt_megatron.models.value import build_value_chunks, save_value_hf_folder
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.batching import collate, token_budget_microbatches
from hpt_megatron.trainer.build import build_optimizer, wrap_ddp
from hpt_megatron.trainer.checkpoint_files import load_checkpoint
from hpt_megatron.trainer.checkpoint_write import save_checkpoint
from hpt_megatron.trainer.critic import CriticEngine, CriticLoss, critic_trainer_config
from hpt_megatron.trainer.rows import response_rows


def per_sample(engine, batches):
    out = engine.forward_values(batches)
    if out is None:
        return {}
    return {
        i: v.tolist() for mb, vals in zip(batches, out) for i, v in response_rows(vals, mb).items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--hf", default=None)
    args = ap.parse_args()

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    arch = ARCHS[args.arch]
    model_cfg, hf = ModelConfig(inline=arch), load_hf_config(arch)
    cfg = critic_trainer_config(TrainerConfig(), CriticConfig(lr=1e-3, grad_clip=0.0))
    chunks = build_value_chunks(hf, model_cfg, parallel, pp_rank=ctx.pp_rank)
    if args.save:
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            head = chunks[-1].output_layer
            head.weight.copy_(0.3 * torch.randn(head.weight.shape, generator=gen))
            head.bias.fill_(0.1)
    chunks = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(chunks, cfg, total_steps=10)
    engine = CriticEngine(chunks, optimizer, scheduler, ctx, cfg)
    if args.save:
        save_checkpoint(args.ckpt, engine.model_chunks)
        if args.hf:
            modules = [c.module for c in engine.model_chunks]
            save_value_hf_folder(modules, hf, args.hf, ctx, torch_dtype="float32")
    load_checkpoint(args.ckpt, engine.model_chunks)

    samples = make_samples()
    lengths = [s.num_tokens for s in samples]
    batches = [
        collate(samples, group, pad_to_multiple=args.tp)
        for group in token_budget_microbatches(lengths, 4096)
    ]
    before = per_sample(engine, batches)
    # Old values from the forward (gathered from the last stage); returns a fixed function of row
    # and position.
    gathered = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, before, group=ctx.cpu_group)
    old = {k: v for part in gathered for k, v in part.items()}
    for mb in batches:
        mb.old_values_bs = torch.zeros_like(mb.loss_mask_bs)
        mb.returns_bs = torch.zeros_like(mb.loss_mask_bs)
        mask_bs = mb.loss_mask_bs.bool()
        for row, idx in enumerate(mb.sample_index_b):
            n = int(mask_bs[row].sum())
            # V_old off the current values by up to 0.4, so the 0.2 clip binds on some tokens.
            shift = [0.4 * math.cos(3 * idx + t) for t in range(n)]
            mb.old_values_bs[row][mask_bs[row]] = torch.tensor(old[idx]) + torch.tensor(shift)
            ret = [math.sin(idx + 0.7 * t) for t in range(n)]
            mb.returns_bs[row][mask_bs[row]] = torch.tensor(ret)
    tokens = sum(len(s.response_ids) for s in samples)
    result = engine.train_values(batches, CriticLoss(0.2, tokens))
    after = per_sample(engine, batches)
    gathered = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, after, group=ctx.cpu_group)
    after_all = {k: v for part in gathered for k, v in part.items()}
    if ctx.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(
                {
                    "before": {str(k): v for k, v in sorted(old.items())},
                    "after": {str(k): v for k, v in sorted(after_all.items())},
                    "loss": result.metrics["value_loss"],
                    "clip_frac": result.metrics["value_clip_frac"],
                    "grad_norm": result.grad_norm,
                },
                fh,
            )
    shutdown_distributed()


if __name__ == "__main__":
    main()
