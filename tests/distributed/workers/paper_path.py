"""Worker: the paper configs' training path on CPU, every variant from the same starting weights
in the same ranks (``tests/distributed/test_paper_path.py`` reads what it writes).

``--phase parity`` (DP=2, or TP=2 x DP=2 with ``--tp 2`` on four ranks) trains a tiny llama on a
fixed batch with: the plain fp32 optimizer (the reference: 20 losses, the gradient of step 1,
the weights after step 5); bf16 weights with Megatron's mixed-precision optimizer (20 losses,
the optimizer's classes and dtypes); the distributed optimizer in fp32 and in bf16 (the weights
after step 5 against the plain optimizer's); recomputation (``full`` uniform and block,
``selective``: step 1's loss and gradient); the critic with and without the distributed
optimizer. With ``--ckpt`` the fp32 distributed-optimizer run saves its model and sharded
optimizer state after step 3, goes on to step 6, and a fresh engine in the same ranks loads the
checkpoint and trains steps 4-6 again. ``--phase resume`` (any layout) loads that checkpoint
and trains steps 4-6. ``--only dist_opt`` skips the other variants. Rank 0 writes JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.distributed as dist
from nll_loss import TokenMeanNLL
from train_parity import ARCHS, make_samples

from hpt_megatron.config.algorithm import CriticConfig
from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.models.value import build_value_chunks
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.batching import collate
from hpt_megatron.trainer.build import build_engine, build_optimizer, wrap_ddp
from hpt_megatron.trainer.checkpoint_files import load_checkpoint
from hpt_megatron.trainer.checkpoint_write import save_checkpoint
from hpt_megatron.trainer.critic import CriticEngine, CriticLoss, critic_trainer_config

HF = load_hf_config(ARCHS["llama"])
SAMPLES = make_samples()
TOKENS = sum(len(s.response_ids) for s in SAMPLES)


class Run:
    """One engine of a variant, built from ``start`` (the reference's initial weights)."""

    def __init__(self, ctx, start: list[dict], *, dtype="fp32", dist_opt=False, recompute=None):
        granularity, method = recompute or (None, None)
        model = ModelConfig(
            inline=ARCHS["llama"],
            params_dtype=dtype,
            recompute_granularity=granularity,
            recompute_method=method,
            recompute_num_layers=2 if granularity == "full" else None,
        )
        parallel = ParallelConfig(tp=ctx.tp, backend="gloo")
        chunks = build_model_chunks(HF, model, parallel, pp_rank=0, init_weights=not start)
        for chunk, state in zip(chunks, start):
            chunk.load_state_dict(state)
        trainer = TrainerConfig(lr=1e-3, grad_clip=1.0, use_distributed_optimizer=dist_opt)
        self.ctx = ctx
        self.engine = build_engine(chunks, ctx, trainer, total_steps=20, vocab_size=HF.vocab_size)
        mine = [i for i in range(len(SAMPLES)) if i % ctx.dp == ctx.dp_rank]
        self.batch = [collate(SAMPLES, mine, pad_to_multiple=ctx.tp)]

    def step(self) -> float:
        result = self.engine.train_step(self.batch, TokenMeanNLL(TOKENS))
        return result.metrics["nll_sum"] / result.metrics["tokens"]

    def weights(self) -> torch.Tensor:
        params = [p for chunk in self.engine.model_chunks for p in chunk.parameters()]
        return torch.cat([p.detach().float().reshape(-1) for p in params])

    def grads(self) -> torch.Tensor:
        params = [p for chunk in self.engine.model_chunks for p in chunk.parameters()]
        return torch.cat([p.main_grad.detach().float().reshape(-1) for p in params])


def snapshot(module: torch.nn.Module) -> dict[str, Any]:
    """A copy of ``module``'s state dict (Megatron's ``_extra_state`` entries may be None)."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in module.state_dict().items()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest entry-wise difference over every rank's shard."""
    worst = (a - b).abs().max().reshape(1)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def precision_report(run: Run) -> dict[str, Any]:
    opt = run.engine.optimizer
    subs = getattr(opt, "chained_optimizers", [opt])
    main = [p for sub in subs for group in sub.optimizer.param_groups for p in group["params"]]
    model = [p for chunk in run.engine.model_chunks for p in chunk.parameters()]
    return {
        "classes": sorted({type(sub).__name__ for sub in subs}),
        "model_dtypes": sorted({str(p.dtype) for p in model}),
        "main_dtypes": sorted({str(p.dtype) for p in main}),
        "adam_dtypes": sorted(
            {str(v.dtype) for sub in subs for s in sub.optimizer.state.values() for v in s.values()}
        ),
    }


def critic_run(ctx, start: list[dict], dist_opt: bool) -> tuple[torch.Tensor, list[dict]]:
    """The critic's weights after 5 value updates towards fixed returns, and its starting state
    (``start``, else its random initialisation)."""
    cfg = critic_trainer_config(
        TrainerConfig(use_distributed_optimizer=dist_opt), CriticConfig(lr=1e-3, grad_clip=1.0)
    )
    parallel = ParallelConfig(tp=ctx.tp, backend="gloo")
    model = ModelConfig(inline=ARCHS["llama"])
    chunks = build_value_chunks(HF, model, parallel, pp_rank=0, init_weights=not start)
    for chunk, state in zip(chunks, start):
        chunk.load_state_dict(state)
    start = [snapshot(chunk) for chunk in chunks]
    chunks = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(chunks, cfg, total_steps=5)
    engine = CriticEngine(chunks, optimizer, scheduler, ctx, cfg)
    mine = [i for i in range(len(SAMPLES)) if i % ctx.dp == ctx.dp_rank]
    mb = collate(SAMPLES, mine, pad_to_multiple=ctx.tp)
    mb.old_values_bs = torch.zeros_like(mb.loss_mask_bs)
    positions = torch.arange(mb.loss_mask_bs.shape[1], dtype=torch.float32)
    mb.returns_bs = torch.sin(0.3 * positions)[None, :].expand_as(mb.loss_mask_bs).clone()
    for _ in range(5):
        engine.train_values([mb], CriticLoss(None, TOKENS))
    params = [p.detach().reshape(-1) for chunk in engine.model_chunks for p in chunk.parameters()]
    return torch.cat(params), start


def parity(ctx, ckpt: str | None, only: str | None) -> dict[str, Any]:
    ref = Run(ctx, [])
    chunks = ref.engine.model_chunks
    start = [snapshot(chunk.module) for chunk in chunks]
    initial = ref.weights()
    out: dict[str, Any] = {}
    if only != "dist_opt":
        ref_losses = [ref.step()]
        ref_grads = ref.grads()
        for name, recompute in {
            "full_uniform": ("full", "uniform"),
            "full_block": ("full", "block"),
            "selective": ("selective", None),
        }.items():
            run = Run(ctx, start, recompute=recompute)
            loss = run.step()
            out[f"recompute_{name}"] = {
                "loss_diff": abs(loss - ref_losses[0]),
                "grad_diff": max_diff(run.grads(), ref_grads),
            }
    else:
        ref_losses = []
    ref_losses += [ref.step() for _ in range(5 - len(ref_losses))]
    ref_weights = ref.weights()
    out["moved"] = max_diff(ref_weights, initial)
    dist_fp32 = Run(ctx, start, dist_opt=True)
    losses = [dist_fp32.step() for _ in range(3)]
    if ckpt:
        save_checkpoint(ckpt, dist_fp32.engine.model_chunks, dist_fp32.engine.optimizer)
    losses += [dist_fp32.step() for _ in range(2)]
    out["dist_opt_fp32"] = {
        "weight_diff": max_diff(dist_fp32.weights(), ref_weights),
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "classes": precision_report(dist_fp32)["classes"],
    }
    if ckpt:
        out["uninterrupted"] = losses[3:] + [dist_fp32.step()]
        resumed = Run(ctx, start, dist_opt=True)
        load_checkpoint(ckpt, resumed.engine.model_chunks, resumed.engine.optimizer)
        out["resumed_dp2"] = [resumed.step() for _ in range(3)]
        out["resumed_weight_diff"] = max_diff(resumed.weights(), dist_fp32.weights())
    if only == "dist_opt":
        return out
    ref_losses += [ref.step() for _ in range(15)]
    bf16 = Run(ctx, start, dtype="bf16")
    bf16_losses = [bf16.step() for _ in range(5)]
    bf16_weights = bf16.weights()
    bf16_losses += [bf16.step() for _ in range(15)]
    out["fp32_losses"], out["bf16_losses"] = ref_losses, bf16_losses
    out["bf16_precision"] = precision_report(bf16)
    dist_bf16 = Run(ctx, start, dtype="bf16", dist_opt=True)
    for _ in range(5):
        dist_bf16.step()
    out["dist_opt_bf16"] = {
        "weight_diff": max_diff(dist_bf16.weights(), bf16_weights),
        "max_abs_weight": max_diff(bf16_weights, torch.zeros_like(bf16_weights)),
        "precision": precision_report(dist_bf16),
    }
    critic_plain, critic_start = critic_run(ctx, [], dist_opt=False)
    critic_dist, _ = critic_run(ctx, critic_start, dist_opt=True)
    out["critic_weight_diff"] = max_diff(critic_dist, critic_plain)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["parity", "resume"], default="parity")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ckpt")
    ap.add_argument("--only", choices=["dist_opt"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ctx = init_distributed(ParallelConfig(tp=args.tp, backend="gloo"), seed=1)
    torch.manual_seed(0)
    if args.phase == "parity":
        out = parity(ctx, args.ckpt, args.only)
    else:
        run = Run(ctx, [], dist_opt=True)
        load_checkpoint(args.ckpt, run.engine.model_chunks, run.engine.optimizer)
        out = {"resumed": [run.step() for _ in range(3)], "dp": ctx.dp}
    if ctx.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(out, fh)
    shutdown_distributed()


if __name__ == "__main__":
    main()
