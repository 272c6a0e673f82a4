"""Per-token log-probs and entropy from vocabulary-parallel logits, in fp32, chunked.

Shape legend: N tokens (batch x sequence flattened), V_l = the local vocabulary shard (V / tp),
C = tokens per chunk.

Peer frameworks run out of memory here: ``log_softmax(logits.float())`` makes two fp32 copies of
[N, V] (and more in backward). This autograd function never holds more than two fp32 [C, V_l]
blocks: the forward keeps three fp32 numbers per token (log-partition, entropy, target logit) and
the backward recomputes the softmax chunk by chunk, writing the gradient straight into a tensor of
the logits' own dtype. The full vocabulary is never gathered: the tensor-parallel ranks exchange
[N]-sized statistics (one max and one sum all-reduce).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 2**25  # default fp32 elements per chunk block


def _chunks(num_tokens: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, num_tokens)) for i in range(0, num_tokens, chunk)]


def _all_reduce(
    tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None
) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits_nv: torch.Tensor,
        targets_n: torch.Tensor,
        vocab_start: int,
        tp_group: dist.ProcessGroup | None,
        chunk: int,
        num_valid: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, local_vocab = logits_nv.shape
        # Columns of this shard at or past the true vocabulary size are padding: left out.
        pad_from = max(0, min(local_vocab, num_valid - vocab_start))
        local_t = targets_n - vocab_start
        in_shard_n = (local_t >= 0) & (local_t < pad_from)
        local_t = local_t.clamp(0, max(pad_from, 1) - 1)
        spans = _chunks(num_tokens, chunk)

        max_n = torch.empty(num_tokens, dtype=torch.float32, device=logits_nv.device)
        for i, j in spans:
            max_n[i:j] = logits_nv[i:j, :pad_from].max(dim=-1).values if pad_from else float("-inf")
        _all_reduce(max_n, dist.ReduceOp.MAX, tp_group)

        # stats_3n: [sum exp(s), sum exp(s) * s, target s (0 off-shard)] with s = l - m. Working
        # with s rather than l keeps the entropy (log sum - mean s) and the log-prob (s_t - log sum)
        # free of the cancellation of two numbers of the size of m: at low entropy the unshifted
        # form loses about |m| / H of fp32 precision.
        stats_3n = torch.empty(3, num_tokens, dtype=torch.float32, device=logits_nv.device)
        stats_3n.zero_()
        for i, j in spans if pad_from else []:  # a shard of padding only contributes nothing
            # Low-precision minus fp32 promotes to fp32 in one kernel (no fp32 copy of the chunk).
            s_cv = logits_nv[i:j, :pad_from] - max_n[i:j, None]
            e_cv = torch.exp(s_cv)
            stats_3n[0, i:j] = e_cv.sum(-1)
            stats_3n[2, i:j] = s_cv.gather(-1, local_t[i:j, None]).squeeze(-1)
            stats_3n[1, i:j] = e_cv.mul_(s_cv).sum(-1)
            del s_cv, e_cv  # free this chunk before the next one allocates
        stats_3n[2] *= in_shard_n
        _all_reduce(stats_3n, dist.ReduceOp.SUM, tp_group)

        log_sum_n = torch.log(stats_3n[0])
        logz_n = max_n + log_sum_n
        logprob_n = stats_3n[2] - log_sum_n
        entropy_n = log_sum_n - stats_3n[1] / stats_3n[0]
        ctx.save_for_backward(logits_nv, local_t, in_shard_n, logz_n, entropy_n)
        ctx.chunk = chunk
        ctx.pad_from = pad_from
        return logprob_n, entropy_n

    @staticmethod
    def backward(ctx, grad_logprob_n: torch.Tensor, grad_entropy_n: torch.Tensor):
        logits_nv, local_t, in_shard_n, logz_n, entropy_n = ctx.saved_tensors
        grad_nv = torch.empty_like(logits_nv)
        g_lp = grad_logprob_n.float() if grad_logprob_n is not None else torch.zeros_like(logz_n)
        g_h = grad_entropy_n.float() if grad_entropy_n is not None else torch.zeros_like(logz_n)
        pad_from = ctx.pad_from
        grad_nv[:, pad_from:] = 0  # padding columns carry no probability
        for i, j in _chunks(logits_nv.shape[0], ctx.chunk) if pad_from else []:
            # fp32, a new tensor (see forward)
            logp_cv = logits_nv[i:j, :pad_from] - logz_n[i:j, None]
            g_cv = torch.exp(logp_cv)
            # d logprob / dl = onehot - p ;  d entropy / dl = -p * (log p + H). The factor
            # g_lp + g_h * (log p + H) is built in place, so a chunk costs two fp32 [C, V_l] blocks.
            logp_cv.add_(entropy_n[i:j, None]).mul_(g_h[i:j, None]).add_(g_lp[i:j, None])
            g_cv.mul_(logp_cv).neg_()
            rows = torch.arange(j - i, device=g_cv.device)
            g_cv[rows, local_t[i:j]] += g_lp[i:j] * in_shard_n[i:j]
            grad_nv[i:j, :pad_from] = g_cv
            del logp_cv, g_cv
        return grad_nv, None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits_btv: torch.Tensor,
    targets_bt: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token and the entropy of each position's distribution.

    Args:
        logits_btv: this rank's vocabulary shard of the logits (rank r holds ids
            ``[r * V_l, (r + 1) * V_l)``), any float dtype; not modified.
        targets_bt: global token ids to score (for next-token scoring, the inputs shifted by one).
        tp_group: the tensor-parallel group the vocabulary is split over (None: not split).
        chunk_tokens: tokens per fp32 chunk; bounds the extra memory to two [C, V_l] fp32 blocks.
            None: ``CHUNK_ELEMENTS // V_l`` tokens, about 128 MiB per block whatever the
            vocabulary and TP size.
        vocab_size: the true vocabulary size; columns past it (Megatron's padding to a multiple
            of TP x 128) get no probability. None: every column is a real token.

    Returns:
        ``(logprobs_bt, entropy_bt)`` in fp32, both differentiable with respect to the logits.
    """
    if logits_btv.shape[:-1] != targets_bt.shape:
        raise ValueError(
            f"logits {tuple(logits_btv.shape)} and targets {tuple(targets_bt.shape)} disagree"
        )
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    local_vocab = logits_btv.shape[-1]
    flat_nv = logits_btv.reshape(-1, local_vocab)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // local_vocab)
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    num_valid = vocab_size if vocab_size is not None else local_vocab * world
    logprob_n, entropy_n = _VocabParallelLogprobEntropy.apply(
        flat_nv,
        targets_bt.reshape(-1),
        rank * local_vocab,
        tp_group,
        max(1, chunk_tokens),
        num_valid,
    )
    return logprob_n.view(targets_bt.shape), entropy_n.view(targets_bt.shape)
