"""``rollout.sglang.check_weights``: a tensor a server returned (``/get_weights_by_name``)
against the one it should hold, for every transport."""

from __future__ import annotations

from typing import Any

import torch


def check_tensor(
    url: str,
    name: str,
    tensor: torch.Tensor,
    answer: Any,
    served_as: torch.dtype | None,
    source: str,
) -> torch.dtype:
    """Raise ``RuntimeError`` naming the server and tensor unless ``answer`` (the server's
    ``/get_weights_by_name`` of ``name``) equals ``tensor`` rounded to the precision the server
    runs in (``served_as``: found on a server's first tensor, then the same for every one; the
    source may be fp32 while the server runs bf16). Returns that precision.

    ``source``: where ``tensor`` comes from, for the message (a folder, the trainer's).
    """
    if not isinstance(answer, list):
        raise RuntimeError(f"check_weights: {url} has no tensor {name}: {answer}")
    served = torch.tensor(answer, dtype=torch.float32).reshape(tensor.shape)
    choices = (
        [served_as] if served_as else [tensor.dtype, torch.float32, torch.bfloat16, torch.float16]
    )
    match = next((d for d in choices if served.equal(tensor.to(d).float())), None)
    if match is None:
        want = tensor.to(choices[0]).float()
        diff = (served - want).abs()
        raise RuntimeError(
            f"check_weights: {url} holds {name} unequal to {source} in {choices[0]} "
            f"(max |diff| {diff.max().item():.3g}, {int((diff > 0).sum())} of {diff.numel()} "
            "elements differ)"
        )
    return match
