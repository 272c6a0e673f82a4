"""Token-mean NLL: the loss the engine-level workers train with (no algorithms package)."""

from __future__ import annotations

import torch

from hpt_megatron.trainer.batching import MicroBatch


class TokenMeanNLL:
    """Negative log-likelihood averaged over every response token of the mini-batch.

    ``total_tokens`` is the number of response tokens in the whole mini-batch over all
    data-parallel ranks, so each micro-batch returns its exact share of the mean.
    """

    def __init__(self, total_tokens: int) -> None:
        if total_tokens <= 0:
            raise ValueError("the mini-batch has no response tokens to train on")
        self.total_tokens = total_tokens

    def __call__(
        self, logprobs_bs: torch.Tensor, entropy_bs: torch.Tensor, mb: MicroBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask_bs = mb.loss_mask_bs.to(logprobs_bs.device)
        nll_sum = -(logprobs_bs * mask_bs).sum()
        metrics = {
            "nll_sum": nll_sum.detach(),
            "entropy_sum": (entropy_bs.detach() * mask_bs).sum(),
            "tokens": mask_bs.sum(),
        }
        return nll_sum / self.total_tokens, metrics
