"""Teacher-forced log-probs of given tokens from SGLang servers (a distillation teacher).

One ``/generate`` request per batch of sequences asks for no new token (``max_new_tokens: 0``)
and the log-probs of the input (``return_logprob``) from ``logprob_start_len``. SGLang reports
``meta_info.input_token_logprobs`` for the input tokens from that position on, each
``[logprob, token_id, text]``, and the first of them without a log-prob (``None``: it would need
the position before the start). So a request for the response tokens of ``prompt + response``
starts at ``len(prompt) - 1``, the prompt's last token, and drops that first entry. The requests
go through :class:`~hpt_megatron.rollout.sglang.client.SGLangClient`, so they are balanced,
retried on another server and wait for a restarted one like generation requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hpt_megatron.rollout.sglang.client import SGLangClient


def score_payload(prompts: Sequence[list[int]], responses: Sequence[list[int]]) -> dict[str, Any]:
    """The ``/generate`` request scoring each ``response`` after its ``prompt`` (a batch)."""
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if not prompt or not response:
            raise ValueError(f"sequence {i}: scoring needs a non-empty prompt and response")
    return {
        "input_ids": [list(p) + list(r) for p, r in zip(prompts, responses)],
        "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": [len(p) - 1 for p in prompts],
    }


def parse_scores(out: Any, responses: Sequence[list[int]]) -> list[list[float]]:
    """Each response's log-probs from the answer to :func:`score_payload`; ``RuntimeError`` when
    the answer does not hold one log-prob for each response token, in order."""
    items = out if isinstance(out, list) else [out]
    if len(items) != len(responses):
        raise RuntimeError(f"/generate scored {len(items)} sequences of {len(responses)}")
    scores = []
    for i, (item, response) in enumerate(zip(items, responses)):
        entries = (item.get("meta_info") or {}).get("input_token_logprobs") or []
        entries = entries[1:]  # the prompt's last token: no log-prob
        ids = [int(e[1]) for e in entries]
        if ids != list(response) or any(e[0] is None for e in entries):
            raise RuntimeError(
                f"sequence {i}: SGLang returned log-probs for tokens {ids[:8]}... where the "
                f"response is {list(response)[:8]}... ({len(ids)} vs {len(response)} tokens)"
            )
        scores.append([float(e[0]) for e in entries])
    return scores


async def score(
    client: SGLangClient,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    *,
    batch_size: int = 64,
) -> list[list[float]]:
    """log pi(response_t | prompt, response_<t) of every response token, in batches of
    ``batch_size`` sequences sent concurrently."""
    starts = range(0, len(prompts), batch_size)
    batches = [(prompts[s : s + batch_size], responses[s : s + batch_size]) for s in starts]
    outs = await asyncio.gather(
        *(client.request("/generate", score_payload(p, r)) for p, r in batches)
    )
    return [row for (_, r), out in zip(batches, outs) for row in parse_scores(out, r)]
