"""SGLang's ``/generate`` wire format: the sampling payload a request carries, the router's
routing key of a prompt, and what an answer holds (tokens, log-probs, finish reason, weight
version, cached prompt tokens, routed experts). Pure functions; :mod:`client` sends and receives.
"""

from __future__ import annotations

import base64
import hashlib
from array import array
from typing import Any

import numpy as np
import torch

from hpt_megatron.data.sample import compact_expert_ids
from hpt_megatron.rollout.base import Generation, SamplingParams

# sglang-router's routing key: with ``--policy manual`` the requests of one key go to one worker
# (the first one to the least-loaded, ``--assignment-mode min_load``).
ROUTING_KEY_HEADER = "x-smg-routing-key"


def routing_key(prompt: list[int]) -> str:
    """The sglang-router routing key of a prompt's requests (``ROUTING_KEY_HEADER``): a hash
    of its token ids, so that its samples, its continuations (partial rollouts) and the same
    prompt in a later step go to the worker that holds its prefix."""
    return hashlib.blake2b(array("q", prompt).tobytes(), digest_size=8).hexdigest()


def sampling_payload(params: SamplingParams) -> dict[str, Any]:
    """SGLang ``sampling_params`` for ``params`` (temperature 0 is greedy in SGLang too)."""
    out: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "skip_special_tokens": False,
    }
    if params.stop_strings:
        out["stop"] = list(params.stop_strings)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    return out


def cached_tokens(out: Any) -> int:
    """Prompt tokens a ``/generate`` answer found in the server's prefix cache (``cached_tokens``
    of each item's ``meta_info``)."""
    items = out if isinstance(out, list) else [out]
    return sum(
        int((item.get("meta_info") or {}).get("cached_tokens") or 0)
        for item in items
        if isinstance(item, dict)
    )


def parse_generation(
    item: dict[str, Any],
    prompt_index: int,
    weight_version: int,
    *,
    prompt: list[int] | None = None,
    routed_top_k: int | None = None,
) -> Generation:
    """One ``/generate`` result -> ``Generation`` (log-probs from ``output_token_logprobs``;
    with ``routed_top_k``, the experts from ``routed_experts``, see :func:`routed_experts`)."""
    meta = item.get("meta_info", {})
    token_ids = list(item["output_ids"])
    entries = meta.get("output_token_logprobs")
    logprobs = [float(e[0]) for e in entries] if entries is not None else None
    if logprobs is not None and len(logprobs) != len(token_ids):
        raise RuntimeError(f"{len(logprobs)} log-probs for {len(token_ids)} tokens from SGLang")
    reason = (meta.get("finish_reason") or {}).get("type", "abort")
    server_version = str(meta.get("weight_version", ""))
    experts = None
    if routed_top_k is not None:
        assert prompt is not None, "the prompt's length shapes the routed experts"
        experts = routed_experts(meta, len(prompt) + len(token_ids), routed_top_k)
    return Generation(
        prompt_index=prompt_index,
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=reason if reason in ("stop", "length") else "abort",
        weight_version=int(server_version) if server_version.isdigit() else weight_version,
        routed_experts=experts,
    )


def routed_experts(meta: dict[str, Any], num_tokens: int, top_k: int) -> torch.Tensor:
    """The experts a server routed each token to, ``[num_tokens - 1, MoE layers, top_k]``.

    SGLang (``--enable-return-routed-experts``, ``return_routed_experts``) sends them as
    base64 of int32 ``[prompt + output - 1, layers, top_k]``: every prompt token and every
    output token but the last (never run), the CPU engine's layout (``Sample.routed_experts``).
    """
    encoded = meta.get("routed_experts")
    if not isinstance(encoded, str):
        raise RuntimeError(
            "SGLang returned no routed_experts: start the servers with "
            "--enable-return-routed-experts (rollout.sglang.routed_experts: true)"
        )
    ids = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
    rows = num_tokens - 1
    if rows < 1 or ids.size % (rows * top_k):
        raise RuntimeError(
            f"SGLang's routed_experts hold {ids.size} ids, not a multiple of {rows} tokens x "
            f"top-k {top_k}"
        )
    return compact_expert_ids(torch.from_numpy(ids.copy()).view(rows, -1, top_k))
