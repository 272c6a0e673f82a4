"""``rollout.sglang.check_weights``: a tensor a server returned (``/get_weights_by_name``)
against the one it should hold, for every transport.

A server may hold the weights in a lower precision than the trainer sends: SGLang's
``--dtype auto`` runs a float32 model in float16 (``_get_and_verify_dtype``), and it rounds
what it receives into its parameters. ``/get_weights_by_name`` answers in float32 lists, so
the precision is learnt from the answers: each tensor leaves the precisions it is exact in,
and a tensor exact in several (a norm's weights of ones) decides none.
"""

from __future__ import annotations

from typing import Any

import torch

# The precisions a server may run in, most precise first.
PRECISIONS: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    url: str,
    name: str,
    tensor: torch.Tensor,
    answer: Any,
    served_as: tuple[torch.dtype, ...],
    source: str,
) -> tuple[torch.dtype, ...]:
    """Raise ``RuntimeError`` naming the server and tensor unless ``answer`` (the server's
    ``/get_weights_by_name`` of ``name``) equals ``tensor`` rounded to one of ``served_as``,
    the precisions the server may run in after the tensors checked on it before (start with
    :data:`PRECISIONS`). Returns those of them ``answer`` agrees with.

    ``source``: where ``tensor`` comes from, for the message (a folder, the trainer's).
    """
    if not isinstance(answer, list):
        raise RuntimeError(f"check_weights: {url} has no tensor {name}: {answer}")
    served = torch.tensor(answer, dtype=torch.float32).reshape(tensor.shape)
    match = tuple(d for d in served_as if served.equal(tensor.to(d).float()))
    if not match:
        want = tensor.to(served_as[0]).float()
        diff = (served - want).abs()
        names = "/".join(str(d).removeprefix("torch.") for d in served_as)
        raise RuntimeError(
            f"check_weights: {url} holds {name} unequal to {source} in {names} (the "
            f"precisions its tensors so far allow; against {served_as[0]}: max |diff| "
            f"{diff.max().item():.3g}, {int((diff > 0).sum())} of {diff.numel()} elements differ)"
        )
    return match
