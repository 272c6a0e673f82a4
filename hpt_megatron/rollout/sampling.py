"""Token sampling shared by the CPU engine and its tests: temperature, top-k, top-p.

Shape legend: B = rows in the batch, V = vocabulary.

Two log-probs come out of every step:
- ``raw``: log-softmax of the model's logits (temperature 1, no truncation). This is what the
  trainer recomputes as pi_old / pi_theta, so it is what a rollout log-prob should be compared with.
- ``sampled``: log-prob under the distribution the token was actually drawn from (after
  temperature, top-k and top-p). With temperature 1 and no truncation the two are equal.
"""

from __future__ import annotations

import torch

from hpt_megatron.config.rollout import check_sampling
from hpt_megatron.rollout.base import SamplingParams


def validate_sampling(params: SamplingParams) -> None:
    """Raise ``ValueError`` naming the field of ``params`` that is out of range."""
    check_sampling(params.n, params.temperature, params.top_p, params.top_k, prefix="sampling ")
    if params.max_new_tokens < 1:
        raise ValueError(f"sampling max_new_tokens must be >= 1, got {params.max_new_tokens}")


def processed_logprobs(logits_bv: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs of the sampling distribution: logits / temperature, then top-k, then top-p.

    Tokens outside top-k / top-p get ``-inf``. Temperature 0 means greedy; the distribution is then
    reported at temperature 1 (the raw model), as there is no finite temperature-0 log-prob.
    """
    logits_bv = logits_bv.float()
    if params.temperature > 0 and params.temperature != 1.0:
        logits_bv = logits_bv / params.temperature
    vocab = logits_bv.shape[-1]
    if 0 < params.top_k < vocab:
        kth_bv = torch.topk(logits_bv, params.top_k, dim=-1).values[..., -1:]
        logits_bv = logits_bv.masked_fill(logits_bv < kth_bv, float("-inf"))
    if params.top_p < 1.0:
        sorted_bv, order_bv = torch.sort(logits_bv, dim=-1, descending=True)
        probs_bv = torch.softmax(sorted_bv, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p; always keep the first.
        drop_bv = (torch.cumsum(probs_bv, dim=-1) - probs_bv) >= params.top_p
        drop_bv[..., 0] = False
        logits_bv = logits_bv.masked_fill(
            torch.zeros_like(drop_bv).scatter(-1, order_bv, drop_bv), float("-inf")
        )
    return torch.log_softmax(logits_bv, dim=-1)


def sample_tokens(
    logits_bv: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row.

    Returns:
        ``(tokens_b, sampled_logprobs_b, raw_logprobs_b)``: the tokens, their log-probs under the
        sampling distribution, and under the raw model (see the module docstring).
    """
    raw_bv = torch.log_softmax(logits_bv.float(), dim=-1)
    if params.temperature == 0:
        tokens_b = torch.argmax(raw_bv, dim=-1)
        raw_b = raw_bv.gather(-1, tokens_b[:, None]).squeeze(-1)
        return tokens_b, raw_b, raw_b
    proc_bv = processed_logprobs(logits_bv, params)
    tokens_b = torch.multinomial(proc_bv.exp(), 1, generator=generator).squeeze(-1)
    sampled_b = proc_bv.gather(-1, tokens_b[:, None]).squeeze(-1)
    raw_b = raw_bv.gather(-1, tokens_b[:, None]).squeeze(-1)
    return tokens_b, sampled_b, raw_b
