"""Per-token log-probs and entropy from vocabulary-parallel logits, in fp32, chunked.

Shape legend: N tokens (batch x sequence flattened), V_l = the local vocabulary shard (V / tp),
C = tokens per chunk.

Peer frameworks run out of memory here: ``log_softmax(logits.float())`` makes two fp32 copies of
[N, V] (and more in backward). This autograd function never holds more than one fp32 [C, V_l]
chunk: the forward keeps three fp32 numbers per token (log-partition, entropy, target logit) and
the backward recomputes the softmax chunk by chunk, writing the gradient straight into a tensor of
the logits' own dtype. The full vocabulary is never gathered: the tensor-parallel ranks exchange
[N]-sized statistics (one max and one sum all-reduce).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _chunks(num_tokens: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, num_tokens)) for i in range(0, num_tokens, chunk)]


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,  # noqa: ANN001
        logits_nv: torch.Tensor,
        targets_n: torch.Tensor,
        vocab_start: int,
        tp_group: dist.ProcessGroup | None,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, local_vocab = logits_nv.shape
        local_t = targets_n - vocab_start
        in_shard_n = (local_t >= 0) & (local_t < local_vocab)
        local_t = local_t.clamp(0, local_vocab - 1)
        spans = _chunks(num_tokens, chunk)

        max_n = torch.empty(num_tokens, dtype=torch.float32, device=logits_nv.device)
        for i, j in spans:
            max_n[i:j] = logits_nv[i:j].max(dim=-1).values.float()
        _all_reduce(max_n, dist.ReduceOp.MAX, tp_group)

        # stats_3n: [sum exp(s), sum exp(s) * s, target s (0 off-shard)] with s = l - m. Working
        # with s rather than l keeps the entropy (log sum - mean s) and the log-prob (s_t - log sum)
        # free of the cancellation of two numbers of the size of m: at low entropy the unshifted
        # form loses about |m| / H of fp32 precision.
        stats_3n = torch.empty(3, num_tokens, dtype=torch.float32, device=logits_nv.device)
        for i, j in spans:
            s_cv = logits_nv[i:j].float() - max_n[i:j, None]
            e_cv = torch.exp(s_cv)
            stats_3n[0, i:j] = e_cv.sum(-1)
            stats_3n[1, i:j] = (e_cv * s_cv).sum(-1)
            stats_3n[2, i:j] = s_cv.gather(-1, local_t[i:j, None]).squeeze(-1)
        stats_3n[2] *= in_shard_n
        _all_reduce(stats_3n, dist.ReduceOp.SUM, tp_group)

        log_sum_n = torch.log(stats_3n[0])
        logz_n = max_n + log_sum_n
        logprob_n = stats_3n[2] - log_sum_n
        entropy_n = log_sum_n - stats_3n[1] / stats_3n[0]
        ctx.save_for_backward(logits_nv, local_t, in_shard_n, logz_n, entropy_n)
        ctx.chunk = chunk
        return logprob_n, entropy_n

    @staticmethod
    def backward(ctx, grad_logprob_n: torch.Tensor, grad_entropy_n: torch.Tensor):  # noqa: ANN001, ANN205
        logits_nv, local_t, in_shard_n, logz_n, entropy_n = ctx.saved_tensors
        grad_nv = torch.empty_like(logits_nv)
        g_lp = grad_logprob_n.float() if grad_logprob_n is not None else torch.zeros_like(logz_n)
        g_h = grad_entropy_n.float() if grad_entropy_n is not None else torch.zeros_like(logz_n)
        for i, j in _chunks(logits_nv.shape[0], ctx.chunk):
            l_cv = logits_nv[i:j].float()
            shifted_cv = l_cv - logz_n[i:j, None]  # log p
            p_cv = torch.exp(shifted_cv)
            # d logprob / dl = onehot - p ;  d entropy / dl = -p * (log p + H)
            g_cv = p_cv.mul_(-(g_lp[i:j, None] + g_h[i:j, None] * (shifted_cv + entropy_n[i:j, None])))
            rows = torch.arange(j - i, device=g_cv.device)
            g_cv[rows, local_t[i:j]] += g_lp[i:j] * in_shard_n[i:j]
            grad_nv[i:j] = g_cv
        return grad_nv, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits_btv: torch.Tensor,
    targets_bt: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token and the entropy of each position's distribution.

    Args:
        logits_btv: this rank's vocabulary shard of the logits (rank r holds ids
            ``[r * V_l, (r + 1) * V_l)``), any float dtype; not modified.
        targets_bt: global token ids to score (for next-token scoring, the inputs shifted by one).
        tp_group: the tensor-parallel group the vocabulary is split over (None: not split).
        chunk_tokens: tokens per fp32 chunk; bounds the extra memory to one [C, V_l] fp32 block.

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
    logprob_n, entropy_n = _VocabParallelLogprobEntropy.apply(
        flat_nv, targets_bt.reshape(-1), rank * local_vocab, tp_group, max(1, chunk_tokens)
    )
    return logprob_n.view(targets_bt.shape), entropy_n.view(targets_bt.shape)
