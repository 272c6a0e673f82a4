"""Worker: vocab-parallel log-probs/entropy at TP=world size over gloo versus the unsplit maths.

Every rank builds the same full logits [B, T, V] (same seed), keeps its vocabulary shard
``[r * V / tp, (r + 1) * V / tp)`` and computes log-probs, entropy and the gradient of a random
linear function of them over the group. The same is computed unsplit on the full logits; rank 0
prints one JSON line with the worst differences over all ranks.

With ``--fused`` the input is hidden states [B * T, H] and an output weight [V, H] (each rank
its row shard) through fused_logprobs_entropy; the reference is the unfused, unsplit path on
``hidden @ weight.T``, and the gradients compared are the hidden states' (summed over the group,
as Megatron's output layer reduces it) and the weight shard's.
"""

import argparse
import json

import torch
import torch.distributed as dist

from hpt_megatron.parallel.logprobs import fused_logprobs_entropy, vocab_parallel_logprobs_entropy


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
    ap.add_argument("--fused", action="store_true")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    if args.fused:
        fused_main(args)
        dist.destroy_process_group()
        return
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


def fused_main(args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    N, H, V = 18, 12, args.vocab
    true_v = args.true_vocab or V
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.8
    weight[true_v:] = 5.0  # padding rows: must not count
    targets = torch.randint(0, true_v, (N,), generator=gen)
    g_lp, g_h = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    shard = slice(rank * V // world, (rank + 1) * V // world)

    x = hidden.clone().requires_grad_(True)
    w = weight[shard].clone().requires_grad_(True)
    lp, h = fused_logprobs_entropy(
        x, w, targets, tp_group=dist.group.WORLD, chunk_tokens=args.chunk, vocab_size=true_v
    )
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    grad_x = x.grad.clone()
    dist.all_reduce(grad_x)  # what copy_to_tensor_model_parallel_region's backward does

    rx = hidden.clone().requires_grad_(True)
    rw = weight[:true_v].clone().requires_grad_(True)
    ref_lp, ref_h = vocab_parallel_logprobs_entropy(rx @ rw.t(), targets, chunk_tokens=args.chunk)
    ((ref_lp * g_lp).sum() + (ref_h * g_h).sum()).backward()
    ref_w = torch.nn.functional.pad(rw.grad, (0, 0, 0, V - true_v))

    # Exact maths, to tell rounding from error: the float64 log_softmax of the same logits.
    dx = hidden.double().requires_grad_(True)
    dw = weight[:true_v].double().requires_grad_(True)
    logp = torch.log_softmax(dx @ dw.t(), dim=-1)
    d_lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    d_h = -(logp.exp() * logp).sum(-1)
    ((d_lp * g_lp.double()).sum() + (d_h * g_h.double()).sum()).backward()
    d_w = torch.nn.functional.pad(dw.grad, (0, 0, 0, V - true_v))

    def rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
        return float((a.double() - b.double()).abs().max() / scale.double().abs().max())

    errors = torch.tensor(
        [
            rel(lp, ref_lp, ref_lp),
            rel(h, ref_h, ref_h),
            rel(grad_x, rx.grad, rx.grad),
            rel(w.grad, ref_w[shard], ref_w),
            rel(grad_x, dx.grad, dx.grad),
            rel(w.grad, d_w[shard], d_w),
            rel(rx.grad, dx.grad, dx.grad),
            rel(ref_w, d_w, d_w),
        ],
        dtype=torch.float64,
    )
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    owners = torch.bincount(targets * world // V, minlength=world)
    if rank == 0:
        print(
            json.dumps(
                {
                    "logprobs": errors[0].item(),
                    "entropy": errors[1].item(),
                    "grad_hidden": errors[2].item(),
                    "grad_weight": errors[3].item(),
                    "exact_grad_hidden": errors[4].item(),
                    "exact_grad_weight": errors[5].item(),
                    "unfused_exact_grad_hidden": errors[6].item(),
                    "unfused_exact_grad_weight": errors[7].item(),
                    "targets_per_rank": owners.tolist(),
                }
            )
        )


if __name__ == "__main__":
    main()
