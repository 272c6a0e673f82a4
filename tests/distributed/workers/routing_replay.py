"""Worker: score saved rollouts of a Qwen3-MoE folder with and without routing replay.

Loads the HF folder ``--hf`` at the given TP/PP/EP, reads the samples (with the rollout engine's
``routed_experts``) from ``--samples`` and writes JSON (rank 0): each sample's response log-probs
with the routers replaying the recorded experts (``replay``) and routing themselves (``own``),
and the router weights' gradient norm of one NLL step under replay (it must still flow; at
TP=1, see below).
The micro-batches are the policy update's (``trainer.update.local_microbatches``).
"""

import argparse
import dataclasses
import json
import math

import torch
from nll_loss import TokenMeanNLL

from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.data.sample import RolloutBatch
from hpt_megatron.models.moe import RoutingReplay
from hpt_megatron.models.provider import load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.build import build_policy, init_policy_weights
from hpt_megatron.trainer.update import UpdateLayout, local_microbatches


class WeightedNLL(TokenMeanNLL):
    """Token-mean NLL of the rows with weight (the update's zero-weight filler rows add none)."""

    def __call__(self, logprobs_bs, entropy_bs, mb):
        keep_bs = mb.loss_mask_bs * (mb.rl_weight_b > 0).float()[:, None]
        return super().__call__(
            logprobs_bs, entropy_bs, dataclasses.replace(mb, loss_mask_bs=keep_bs)
        )


def response_logprobs(engine, samples, batches) -> dict[int, list[float]]:
    out = engine.forward_logprobs(batches)
    result: dict[int, list[float]] = {}
    for mb, (lp, _) in zip(batches, out or []):
        for row, idx in enumerate(mb.sample_index_b):
            if mb.rl_weight_b[row] > 0:  # not an idle filler row (a zero-weight copy)
                result[idx] = lp[row][mb.loss_mask_bs[row].bool()].tolist()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--packing", action="store_true")
    args = ap.parse_args()

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    hf = load_hf_config(f"{args.hf}/config.json")
    model_cfg = ModelConfig(hf_config=f"{args.hf}/config.json", hf_weights=args.hf)
    trainer_cfg = TrainerConfig(lr=1e-3, grad_clip=0.0, max_tokens_per_microbatch=64)
    engine = build_policy(hf, model_cfg, parallel, trainer_cfg, ctx, total_steps=1)
    init_policy_weights(engine, hf, model_cfg)
    engine.routing_replay = RoutingReplay.attach(engine.model_chunks, ctx.tp_rank, ctx.tp)

    samples = RolloutBatch.load_jsonl(args.samples).samples
    common = dict(
        dp=ctx.dp,
        dp_rank=ctx.dp_rank,
        max_tokens=64,  # several micro-batches (PP runs them through its schedule)
        pad_to_multiple=ctx.tp,
        packing=args.packing,
        equal_microbatch_counts=ctx.ep > 1,
    )
    replayed = local_microbatches(samples, UpdateLayout(**common, routing_replay=True))
    routed = local_microbatches(samples, UpdateLayout(**common))
    replay = response_logprobs(engine, samples, replayed)
    own = response_logprobs(engine, samples, routed)

    # Megatron trains MoE layers under TP only with sequence parallelism, which its local (CPU)
    # layers lack: the gradient check runs at TP=1.
    sq = 0.0  # this rank's share of the router gradient
    if ctx.tp == 1:
        total = sum(len(s.response_ids) for s in samples)
        engine.train_step(replayed, WeightedNLL(total))
        for chunk in engine.model_chunks:
            for name, param in chunk.named_parameters():
                if name.endswith("router.weight"):
                    sq += float(param.main_grad.double().pow(2).sum())
    group = ctx.cpu_group if ctx.world_size > 1 else None
    changed = engine.routing_replay.collect(group, counts=ctx.tp_rank == 0)
    gathered = [None] * ctx.world_size
    torch.distributed.all_gather_object(
        gathered, (replay, own, sq, ctx.dp_rank), group=ctx.cpu_group
    )
    if ctx.rank == 0:
        merged_replay, merged_own = {}, {}
        router_sq = {}
        for r, o, s, dp_rank in gathered:
            merged_replay.update(r)
            merged_own.update(o)
            router_sq[dp_rank] = router_sq.get(dp_rank, 0.0) + s
        with open(args.out, "w") as fh:
            json.dump(
                {
                    "replay": {str(k): v for k, v in sorted(merged_replay.items())},
                    "own": {str(k): v for k, v in sorted(merged_own.items())},
                    "replay_changed_frac": changed["moe/replay_changed_frac"],
                    "router_grad_norm": math.sqrt(router_sq[0]) if ctx.tp == 1 else None,
                },
                fh,
            )
    shutdown_distributed()


if __name__ == "__main__":
    main()
