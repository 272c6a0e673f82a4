"""Worker: load one checkpoint at a given TP/PP/DP, score a fixed batch, train one NLL step.

Writes JSON (rank 0) with the log-probs of every sample before the step, the loss, the gradient
norm and the log-probs after the step. Run with ``--save`` (one process) to create the checkpoint.
"""

import argparse
import dataclasses
import json
import random

import torch
from nll_loss import TokenMeanNLL

from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.data.sample import Sample
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.batching import (
    collate,
    collate_packed,
    microbatch_count_multiple,
    packed_microbatches,
    split_to_multiple,
    token_budget_microbatches,
)
from hpt_megatron.trainer.build import build_engine, init_policy_weights
from hpt_megatron.trainer.checkpoint_files import load_checkpoint
from hpt_megatron.trainer.checkpoint_write import save_checkpoint

ARCHS = {
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=250,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=250,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
    # 8 experts, top-2, the second of four layers dense; QK norm, GQA.
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        vocab_size=250,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
}


def make_samples(n: int = 8, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 250) for _ in range(rng.randrange(3, 9))]
        resp = [rng.randrange(1, 250) for _ in range(rng.randrange(2, 12))]
        out.append(Sample(prompt_id=str(i), group_id=i, prompt_ids=prompt, response_ids=resp))
    return out


def per_sample_logprobs(engine, samples, mbs, batches):
    out = engine.forward_logprobs(batches)
    if out is None:
        return None
    result = {}
    for mb, (lp, _) in zip(batches, out):
        for row, idx in enumerate(mb.sample_index_b):
            mask = mb.loss_mask_bs[row].bool()
            result[idx] = lp[row][mask].tolist()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--vpp", type=int, help="virtual pipeline stages per rank")
    ap.add_argument("--hf-weights", help="start from this HF folder (no random initialisation)")
    ap.add_argument("--write-hf", help="only write a random HF model of --arch to this folder")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--packing", action="store_true", help="several sequences per row")
    ap.add_argument("--grads", action="store_true", help="write each rank's gradient of the step")
    args = ap.parse_args()
    if args.write_hf:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        arch = {k: v for k, v in ARCHS[args.arch].items() if k != "architectures"}
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch)).save_pretrained(
            args.write_hf
        )
        return

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    model_cfg = ModelConfig(inline=ARCHS[args.arch])
    trainer_cfg = TrainerConfig(lr=1e-3, grad_clip=0.0, max_tokens_per_microbatch=args.max_tokens)

    hf = load_hf_config(ARCHS[args.arch])
    init = args.hf_weights is None
    chunks = build_model_chunks(hf, model_cfg, parallel, pp_rank=ctx.pp_rank, init_weights=init)
    engine = build_engine(chunks, ctx, trainer_cfg, total_steps=10, vocab_size=hf.vocab_size)
    if args.hf_weights:
        init_policy_weights(engine, hf, dataclasses.replace(model_cfg, hf_weights=args.hf_weights))
    elif args.save:
        save_checkpoint(args.ckpt, engine.model_chunks)
    else:
        load_checkpoint(args.ckpt, engine.model_chunks)

    samples = make_samples()
    total_tokens = sum(len(s.response_ids) for s in samples)
    # DP shard: round-robin by index; every rank of a model-parallel group sees the same shard.
    mine = [i for i in range(len(samples)) if i % ctx.dp == ctx.dp_rank]
    lengths = [samples[i].num_tokens for i in mine]
    if args.packing:
        batches = [
            collate_packed(samples, [[mine[j] for j in r] for r in rows], pad_to_multiple=args.tp)
            for rows in packed_microbatches(lengths, args.max_tokens)
        ]
    else:
        groups = token_budget_microbatches(lengths, args.max_tokens)
        groups = split_to_multiple(groups, microbatch_count_multiple(args.pp, args.vpp))
        batches = [
            collate(samples, [mine[j] for j in group], pad_to_multiple=args.tp) for group in groups
        ]
    before = per_sample_logprobs(engine, samples, mine, batches)
    result = engine.train_step(batches, TokenMeanNLL(total_tokens))
    # The step's gradient stays in DDP's buffers until the next step zeroes them.
    grads = [p.main_grad.reshape(-1) for chunk in engine.model_chunks for p in chunk.parameters()]
    grad = torch.cat(grads).tolist() if args.grads else []
    after = per_sample_logprobs(engine, samples, mine, batches)

    gathered = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, (before, after, grad), group=ctx.cpu_group)
    if ctx.rank == 0:
        merged_before, merged_after = {}, {}
        for b, a, _ in gathered:
            merged_before.update(b or {})
            merged_after.update(a or {})
        with open(args.out, "w") as fh:
            json.dump(
                {
                    "before": {str(k): v for k, v in sorted(merged_before.items())},
                    "after": {str(k): v for k, v in sorted(merged_after.items())},
                    "loss": result.metrics["nll_sum"] / result.metrics["tokens"],
                    "tokens": result.metrics["tokens"],
                    "grad_norm": result.grad_norm,
                    "num_microbatches": len(batches),
                    "model_rows": sum(mb.model_shape[0] for mb in batches),
                    "grads": [g for _, _, g in gathered],  # per rank (with --grads)
                },
                fh,
            )
    shutdown_distributed()


if __name__ == "__main__":
    main()
