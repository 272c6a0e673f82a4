"""Worker: the KL term's gradient through the trainer (``PolicyUpdate`` with a ``ReferencePolicy``).

With every advantage 0 the loss is ``kl_coef`` times the token mean of the KL estimate, so the
gradient that reaches each per-token log-prob is known in closed form. The worker records, for each
response token, log pi_old, log pi_ref and that gradient (as Megatron's schedule sees it, then
undone of the engine's M x D scale), for k1, k2 and k3. ``--save`` (one process) writes the
policy checkpoint and a perturbed copy as the reference.
"""

import argparse
import json

import torch
from train_parity import ARCHS, make_samples

from hpt_megatron.config.algorithm import ReferenceConfig
from hpt_megatron.config.presets import get_preset
from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.build import build_engine
from hpt_megatron.trainer.checkpoint_files import load_checkpoint
from hpt_megatron.trainer.checkpoint_write import save_checkpoint
from hpt_megatron.trainer.reference import ReferencePolicy
from hpt_megatron.trainer.rows import response_rows
from hpt_megatron.trainer.update import PolicyUpdate, UpdateLayout

COEF = 0.5


class Recording:
    """The engine, with the gradient at each micro-batch's log-probs recorded."""

    def __init__(self, engine):
        self.engine = engine
        self.rows: dict[int, dict] = {}

    def forward_logprobs(self, microbatches):
        return self.engine.forward_logprobs(microbatches)

    def train_step(self, microbatches, loss_fn):
        scale = len(microbatches) * self.engine.ctx.dp

        def recorded(logprobs_bs, entropy_bs, mb):
            def hook(grad_bs):
                grads = response_rows(grad_bs.detach() / scale, mb)
                old = response_rows(mb.old_logprobs_bs, mb)
                ref = response_rows(mb.ref_logprobs_bs, mb)
                for idx in grads:
                    self.rows[idx] = {
                        "grad": grads[idx].tolist(),
                        "old": old[idx].tolist(),
                        "ref": ref[idx].tolist(),
                    }

            logprobs_bs.register_hook(hook)
            return loss_fn(logprobs_bs, entropy_bs, mb)

        return self.engine.train_step(microbatches, recorded)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()

    parallel = ParallelConfig(tp=args.tp, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    arch = ARCHS["llama"]
    model_cfg, hf = ModelConfig(inline=arch), load_hf_config(arch)
    trainer_cfg = TrainerConfig(lr=1e-3, grad_clip=0.0)
    chunks = build_model_chunks(hf, model_cfg, parallel, pp_rank=ctx.pp_rank)
    engine = build_engine(chunks, ctx, trainer_cfg, total_steps=10, vocab_size=hf.vocab_size)
    if args.save:
        save_checkpoint(f"{args.ckpt}/policy", engine.model_chunks)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in engine.model_chunks[0].module.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
        save_checkpoint(f"{args.ckpt}/reference", engine.model_chunks)
        shutdown_distributed()
        return

    reference = ReferencePolicy.build(hf, model_cfg, parallel, trainer_cfg, ctx)
    ref_cfg = ReferenceConfig(load=f"{args.ckpt}/reference")
    reference.load_weights(engine, hf, model_cfg, ref_cfg, saved=None, fresh=False)  # type: ignore[arg-type]
    samples = make_samples()
    for s in samples:
        s.reward = 0.0  # grpo advantages of equal rewards: 0, so only the KL term has a gradient
    layout = UpdateLayout(dp=ctx.dp, dp_rank=ctx.dp_rank, pad_to_multiple=args.tp)
    result = {}
    for estimator in ("k1", "k2", "k3"):
        load_checkpoint(f"{args.ckpt}/policy", engine.model_chunks)
        spec = get_preset("grpo").with_options(kl_coef=COEF, kl_estimator=estimator)
        recording = Recording(engine)
        metrics = PolicyUpdate(recording, layout, reference).update(samples, spec)
        gathered = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, recording.rows, group=ctx.cpu_group)
        rows = {}
        for part in gathered:
            rows.update(part)
        result[estimator] = {
            "rows": {str(k): v for k, v in sorted(rows.items())},
            "grad_norm": metrics["grad_norm"],
            "kl_ref_mean": metrics["kl_ref_mean"],
            "kl_ref_max": metrics["kl_ref_max"],
        }
    if ctx.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(
                {"coef": COEF, "tokens": sum(len(s.response_ids) for s in samples), **result}, fh
            )
    shutdown_distributed()


if __name__ == "__main__":
    main()
