"""Worker: vocab-parallel log-probs/entropy at TP=world size over gloo versus the unsplit maths.

Every rank builds the same full logits [B, T, V] (same seed), keeps its vocabulary shard
``[r * V / tp, (r + 1) * V / tp)`` and computes log-probs, entropy and the gradient of a random
linear function of them over the group. The same is computed unsplit on the full logits; rank 0
prints one JSON line with the worst differences over all ranks.
"""

import argparse
import json

import torch
import torch.distributed as dist

from hpt_megatron.parallel.logprobs import vocab_parallel_logprobs_entropy


def logprobs_and_grad(logits, targets, g_lp, g_h, group, chunk, vocab_size=None):
    x = logits.clone().requires_grad_(True)
    lp, h = vocab_parallel_logprobs_entropy(
        x, targets, tp_group=group, chunk_tokens=chunk, vocab_size=vocab_size
    )
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    return lp.detach(), h.detach(), x.grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--true-vocab", type=int, default=None, help="columns past it are padding")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    gen = torch.Generator().manual_seed(0)
    B, T, V = 2, 9, args.vocab
    true_v = args.true_vocab or V
    logits = (torch.randn(B, T, V, generator=gen) * 3).to(dtype)
    logits[..., true_v:] = 50.0  # padding: must not count
    targets = torch.randint(0, true_v, (B, T), generator=gen)
    g_lp, g_h = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    shard = slice(rank * V // world, (rank + 1) * V // world)

    group, vocab_size = dist.group.WORLD, args.true_vocab
    lp, h, grad = logprobs_and_grad(
        logits[..., shard], targets, g_lp, g_h, group, args.chunk, vocab_size
    )
    ref_lp, ref_h, ref_grad = logprobs_and_grad(
        logits[..., :true_v], targets, g_lp, g_h, None, args.chunk
    )
    ref_grad = torch.nn.functional.pad(ref_grad, (0, V - true_v))  # padding: zero gradient

    def rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
        # Scale-relative: gradient entries pass through zero, so element-wise ratios mislead.
        return float((a.double() - b.double()).abs().max() / scale.double().abs().max())

    errors = torch.tensor(
        [rel(lp, ref_lp, ref_lp), rel(h, ref_h, ref_h), rel(grad, ref_grad[..., shard], ref_grad)],
        dtype=torch.float64,
    )
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    # Targets on every shard must occur, or the off-shard masking is not exercised.
    owners = torch.bincount(targets.flatten() * world // V, minlength=world)
    pad_grad_zero = torch.tensor(int((grad[..., max(0, true_v - shard.start) :] == 0).all()))
    dist.all_reduce(pad_grad_zero, op=dist.ReduceOp.MIN)  # the padding lives on the last rank
    if rank == 0:
        print(
            json.dumps(
                {
                    "logprobs": errors[0].item(),
                    "entropy": errors[1].item(),
                    "grad": errors[2].item(),
                    "targets_per_rank": owners.tolist(),
                    "grad_dtype": str(grad.dtype),
                    "grad_shape": list(grad.shape),
                    "pad_grad_zero": bool(pad_grad_zero),
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
