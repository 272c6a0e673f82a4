"""Worker: one update with a NaN loss (must be skipped, every weight unchanged), then a finite one
(must update). Writes JSON (rank 0)."""

import argparse
import json

import torch
from nll_loss import TokenMeanNLL
from train_parity import ARCHS, make_samples

from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.batching import collate, token_budget_microbatches
from hpt_megatron.trainer.build import build_engine


class Poisoned(TokenMeanNLL):
    """The NLL times NaN, reporting its ``loss`` like the policy loss does."""

    def __init__(self, total_tokens: int, factor: float) -> None:
        super().__init__(total_tokens)
        self.factor = factor

    def __call__(self, logprobs_bs, entropy_bs, mb):
        share, metrics = super().__call__(logprobs_bs, entropy_bs, mb)
        share = share * self.factor
        return share, {**metrics, "loss": share.detach()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    parallel = ParallelConfig(tp=1, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    hf = load_hf_config(ARCHS["llama"])
    trainer_cfg = TrainerConfig(lr=1e-3, grad_clip=1.0, max_tokens_per_microbatch=64)
    chunks = build_model_chunks(hf, ModelConfig(inline=ARCHS["llama"]), parallel, pp_rank=0)
    engine = build_engine(chunks, ctx, trainer_cfg, total_steps=4)
    samples = make_samples()
    total = sum(len(s.response_ids) for s in samples)
    lengths = [s.num_tokens for s in samples]
    batches = [collate(samples, group) for group in token_budget_microbatches(lengths, 64)]
    params = {n: p for chunk in engine.model_chunks for n, p in chunk.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    bad = engine.train_step(batches, Poisoned(total, float("nan")))
    same_after_bad = all(torch.equal(p.detach(), before[n]) for n, p in params.items())
    good = engine.train_step(batches, Poisoned(total, 1.0))
    changed_after_good = any(not torch.equal(p.detach(), before[n]) for n, p in params.items())
    if ctx.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(
                {
                    "bad": [bad.skipped, bad.grad_norm, bad.metrics["loss"]],
                    "good": [good.skipped, good.grad_norm, good.metrics["loss"]],
                    "same_after_bad": same_after_bad,
                    "changed_after_good": changed_after_good,
                    "lr_steps": engine.scheduler.num_steps,
                },
                fh,
            )
    shutdown_distributed()


if __name__ == "__main__":
    main()
