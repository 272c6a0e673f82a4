"""Per-token log-probs and entropy over a vocabulary-parallel output layer, in fp32, chunked.

Shape legend: N tokens (batch x sequence flattened), H hidden size, V_l = the local vocabulary
shard (V / tp), C = tokens per chunk, V_c = vocabulary columns per chunk, S sequence, B rows.

Peer frameworks run out of memory here: ``log_softmax(logits.float())`` makes two fp32 copies of
[N, V] (and more in backward). Two autograd functions:

- :func:`fused_logprobs_entropy` (what training, old-log-prob recomputation and scoring use, via
  :func:`output_logprobs_entropy`) takes the final hidden states and the output weight: the
  logits exist one [C, V_l] block at a time in forward and one [N, V_c] block at a time in
  backward (recomputed), so neither the [N, V_l] logits nor their gradient are ever stored.
- :func:`vocab_parallel_logprobs_entropy` takes given logits and never holds more than two fp32
  [C, V_l] blocks beside them: the forward keeps three fp32 numbers per token (log-partition,
  entropy, target logit) and the backward recomputes the softmax chunk by chunk, writing the
  gradient straight into a tensor of the logits' own dtype.

The full vocabulary is never gathered: the tensor-parallel ranks exchange [N]-sized statistics
(one max and one sum all-reduce).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 2**24  # default fp32 elements per chunk block (64 MiB; see logprob_memory.py)


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
            None: ``CHUNK_ELEMENTS // V_l`` tokens, about 64 MiB per block whatever the
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


def _block(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` view of the front of a flat, reused ``buffer``."""
    return buffer[: rows * cols].view(rows, cols)


class _FusedOutputLogprobEntropy(torch.autograd.Function):
    """The output layer fused with :class:`_VocabParallelLogprobEntropy`: hidden states in,
    per-token statistics out, the logits only ever one block at a time.

    Forward: chunks of C tokens through the weight shard ([C, V_l] logits), each reduced at once
    to the statistics above, taken relative to the chunk's own (per-token, shard-local) max; the
    max is then reduced over TP and each rank rescales its sums to the global max before the sum
    reduction (one matmul per chunk, no second pass). Backward: chunks of V_c vocabulary columns,
    each recomputing its [N, V_c] logits from the saved hidden states, so the weight gradient of a
    column block is one matmul over all tokens (as unfused) and nothing [N, V] is ever stored.
    The blocks live in buffers allocated once per pass (fresh large allocations cost page faults
    that are a visible share of a CPU pass).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden_nh: torch.Tensor,
        weight_vh: torch.Tensor,
        targets_n: torch.Tensor,
        vocab_start: int,
        tp_group: dist.ProcessGroup | None,
        block: int,
        num_valid: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, local_vocab = hidden_nh.shape[0], weight_vh.shape[0]
        pad_from = max(0, min(local_vocab, num_valid - vocab_start))
        local_t = targets_n - vocab_start
        in_shard_n = (local_t >= 0) & (local_t < pad_from)
        local_t = local_t.clamp(0, max(pad_from, 1) - 1)
        weight_t = weight_vh[:pad_from].t()
        device, dtype = hidden_nh.device, hidden_nh.dtype

        max_n = torch.full((num_tokens,), float("-inf"), dtype=torch.float32, device=device)
        stats_3n = torch.zeros(3, num_tokens, dtype=torch.float32, device=device)
        chunk = min(num_tokens, max(1, block // max(pad_from, 1)))
        size = chunk * pad_from
        s_buf = torch.empty(size, dtype=torch.float32, device=device)
        e_buf = torch.empty(size, dtype=torch.float32, device=device)
        low_buf = torch.empty(size if dtype != torch.float32 else 0, dtype=dtype, device=device)
        for i, j in _chunks(num_tokens, chunk) if pad_from else []:
            s_cv = _block(s_buf, j - i, pad_from)
            if dtype == torch.float32:
                logits_cv = torch.mm(hidden_nh[i:j], weight_t, out=s_cv)
            else:
                logits_cv = torch.mm(hidden_nh[i:j], weight_t, out=_block(low_buf, j - i, pad_from))
            m_c = logits_cv.amax(dim=-1).float()
            torch.sub(logits_cv, m_c[:, None], out=s_cv)  # s = l - m, fp32
            e_cv = torch.exp(s_cv, out=_block(e_buf, j - i, pad_from))
            max_n[i:j] = m_c
            stats_3n[0, i:j] = e_cv.sum(-1)
            stats_3n[2, i:j] = s_cv.gather(-1, local_t[i:j, None]).squeeze(-1)
            stats_3n[1, i:j] = torch.bmm(e_cv[:, None, :], s_cv[:, :, None]).view(-1)  # row dots
        del s_buf, e_buf, low_buf
        stats_3n[2] *= in_shard_n
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            global_max_n = max_n.clone()
            dist.all_reduce(global_max_n, op=dist.ReduceOp.MAX, group=tp_group)
            if pad_from:  # move this shard's sums from its own max to the global one
                shift_n = max_n - global_max_n  # <= 0
                scale_n = torch.exp(shift_n)
                stats_3n[1] = scale_n * (stats_3n[1] + shift_n * stats_3n[0])
                stats_3n[0] *= scale_n
                stats_3n[2] += shift_n * in_shard_n
            max_n = global_max_n
            dist.all_reduce(stats_3n, op=dist.ReduceOp.SUM, group=tp_group)

        log_sum_n = torch.log(stats_3n[0])
        logz_n = max_n + log_sum_n
        logprob_n = stats_3n[2] - log_sum_n
        entropy_n = log_sum_n - stats_3n[1] / stats_3n[0]
        ctx.save_for_backward(hidden_nh, weight_vh, local_t, in_shard_n, logz_n, entropy_n)
        ctx.block = block
        ctx.pad_from = pad_from
        return logprob_n, entropy_n

    @staticmethod
    def backward(ctx, grad_logprob_n: torch.Tensor, grad_entropy_n: torch.Tensor):
        hidden_nh, weight_vh, local_t, in_shard_n, logz_n, entropy_n = ctx.saved_tensors
        g_lp = grad_logprob_n.float() if grad_logprob_n is not None else torch.zeros_like(logz_n)
        g_h = grad_entropy_n.float() if grad_entropy_n is not None else torch.zeros_like(logz_n)
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        device, dtype = hidden_nh.device, hidden_nh.dtype
        grad_hidden = torch.zeros(hidden_nh.shape, dtype=torch.float32, device=device)
        grad_weight = torch.zeros_like(weight_vh) if want_weight else None  # padding rows: 0
        num_tokens, pad_from = hidden_nh.shape[0], ctx.pad_from
        cols = min(max(pad_from, 1), max(1, ctx.block // max(num_tokens, 1)))
        # d/dl of g_lp * logprob + g_h * entropy = onehot * g_lp - p * (g_lp + g_h * (log p + H)):
        # with a = -(g_lp + g_h * H) and b = -g_h that is p * (a + b * log p) off the target, one
        # exp and one fused multiply-add per element.
        a_n1 = (-(g_lp + g_h * entropy_n))[:, None]
        b_n1 = (-g_h)[:, None]
        neg_logz_n1 = (-logz_n)[:, None]
        g_lp_target = g_lp * in_shard_n
        size = num_tokens * cols
        lp_buf = torch.empty(size, dtype=torch.float32, device=device)
        g_buf = torch.empty(size, dtype=torch.float32, device=device)
        low_buf = torch.empty(size if dtype != torch.float32 else 0, dtype=dtype, device=device)
        for c0, c1 in _chunks(pad_from, cols):
            weight_ch = weight_vh[c0:c1]
            logp_nc = _block(lp_buf, num_tokens, c1 - c0)
            if dtype == torch.float32:  # log p = h @ w.T - log Z, the subtraction as the bias
                torch.addmm(neg_logz_n1, hidden_nh, weight_ch.t(), out=logp_nc)
            else:  # log Z stays fp32: the logits in their dtype, then minus it in fp32
                low_nc = _block(low_buf, num_tokens, c1 - c0)
                torch.mm(hidden_nh, weight_ch.t(), out=low_nc)
                torch.sub(low_nc, logz_n[:, None], out=logp_nc)
            g_nc = torch.exp(logp_nc, out=_block(g_buf, num_tokens, c1 - c0))
            g_nc.mul_(torch.addcmul(a_n1, logp_nc, b_n1, out=logp_nc))
            rows = (in_shard_n & (local_t >= c0) & (local_t < c1)).nonzero().squeeze(1)
            g_nc[rows, local_t[rows] - c0] += g_lp_target[rows]
            if dtype != torch.float32:  # the logits' gradient in their dtype, as unfused
                g_nc = _block(low_buf, num_tokens, c1 - c0).copy_(g_nc)
            if want_weight:
                assert grad_weight is not None
                torch.mm(g_nc.t(), hidden_nh, out=grad_weight[c0:c1])
            if want_hidden and dtype == torch.float32:
                grad_hidden.addmm_(g_nc, weight_ch)
            elif want_hidden:
                grad_hidden += g_nc @ weight_ch
        grad_hidden_out = grad_hidden.to(dtype) if want_hidden else None
        return grad_hidden_out, grad_weight, None, None, None, None, None


def fused_logprobs_entropy(
    hidden_nh: torch.Tensor,
    weight_vh: torch.Tensor,
    targets_n: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy ``[N]`` of ``hidden_nh @ weight_vh.T`` without the logits tensor.

    Args:
        hidden_nh: the final hidden states of N tokens (after the final norm), in the model's
            dtype; on every tensor-parallel rank the same (gathered, not sequence-sharded).
            The caller maps their gradient back over TP as the output layer would.
        weight_vh: this rank's vocabulary shard of the output weight (rows
            ``[r * V_l, (r + 1) * V_l)``); the embedding table when the two are tied.
        targets_n: global token ids to score.
        tp_group, vocab_size: as for :func:`vocab_parallel_logprobs_entropy`.
        chunk_tokens: bounds each fp32 block to ``chunk_tokens * V_l`` elements (a block is C
            tokens by V_l columns forward, N tokens by V_c columns backward). None:
            ``CHUNK_ELEMENTS``.

    Returns:
        ``(logprobs_n, entropy_n)`` in fp32, differentiable with respect to the hidden states and
        the weight; neither the [N, V_l] logits nor their gradient are ever held whole.
    """
    if hidden_nh.dim() != 2 or hidden_nh.shape[0] != targets_n.numel():
        raise ValueError(
            f"hidden states {tuple(hidden_nh.shape)} and targets {tuple(targets_n.shape)} disagree"
        )
    if weight_vh.shape[1] != hidden_nh.shape[1]:
        raise ValueError(
            f"output weight {tuple(weight_vh.shape)} and hidden states "
            f"{tuple(hidden_nh.shape)} disagree on the hidden size"
        )
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    local_vocab = weight_vh.shape[0]
    block = CHUNK_ELEMENTS if chunk_tokens is None else max(1, chunk_tokens) * local_vocab
    num_valid = vocab_size if vocab_size is not None else local_vocab * world
    return _FusedOutputLogprobEntropy.apply(
        hidden_nh,
        weight_vh,
        targets_n.reshape(-1),
        rank * local_vocab,
        tp_group,
        block,
        num_valid,
    )


def _unwrap(model: torch.nn.Module) -> Any:
    """The GPTModel inside Megatron's DDP (and any other ``.module`` wrapper)."""
    inner: Any = model
    while hasattr(inner, "module"):
        inner = inner.module
    return inner


@contextmanager
def final_hidden_states(model: torch.nn.Module) -> Iterator[None]:
    """Within it, ``model`` (a Megatron GPTModel, wrapped or not) returns the final hidden states
    ``[S, B, H]`` (after the final norm; sequence-sharded under sequence parallelism) instead
    of running its output layer, on the last pipeline stage as on the others."""
    gpt = _unwrap(model)
    post_process = gpt.post_process
    gpt.post_process = False  # GPTModel._postprocess returns the hidden states when it is off
    try:
        yield
    finally:
        gpt.post_process = post_process


def output_logprobs_entropy(
    model: torch.nn.Module,
    hidden_sbh: torch.Tensor,
    targets_bs: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs_bs, entropy_bs)`` of the last stage's ``model`` from its final hidden states
    (see :func:`final_hidden_states`), through its output weight (the word embeddings when they
    are tied) by :func:`fused_logprobs_entropy`: the model's logits never exist.

    The hidden states enter the tensor-parallel region as Megatron's output layer takes them
    (an all-gather under sequence parallelism, else a copy), so their gradient is reduced over
    TP exactly as unfused.
    """
    from megatron.core import tensor_parallel

    gpt = _unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        weight_vh = gpt.shared_embedding_or_output_weight()
    else:
        weight_vh = gpt.output_layer.weight
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        if gpt.config.sequence_parallel:
            hidden_sbh = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_sbh, tensor_parallel_output_grad=True, group=tp_group
            )
        else:
            hidden_sbh = tensor_parallel.copy_to_tensor_model_parallel_region(
                hidden_sbh, group=tp_group
            )
    seq, batch = hidden_sbh.shape[:2]
    if (batch, seq) != tuple(targets_bs.shape):
        raise ValueError(
            f"hidden states {tuple(hidden_sbh.shape)} ([S, B, H]) and targets "
            f"{tuple(targets_bs.shape)} ([B, S]) disagree"
        )
    logprob_n, entropy_n = fused_logprobs_entropy(
        hidden_sbh.reshape(seq * batch, -1),
        weight_vh,
        targets_bs.t().reshape(-1),
        tp_group=tp_group,
        chunk_tokens=chunk_tokens,
        vocab_size=vocab_size,
    )
    return logprob_n.view(seq, batch).t(), entropy_n.view(seq, batch).t()
