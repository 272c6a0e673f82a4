"""Worker: the critic's phase of one PPO step through the trainer's own path, on hand-built rows.

One process. Builds a policy and its critic (``init_critic_weights``: the policy's trunk, a zero
head), gives the head random weights so that the values vary, and records (JSON on rank 0):

- ``trunk_equal`` / ``head_zero``: the critic's starting weights are the policy's trunk, zero head;
- for each row: the values, returns and advantages ``critic_phase`` wrote into the micro-batch
  at the response positions, and an independent plain forward of the same critic module on the
  row alone (its outputs at every position), the row's reward and prompt length;
- ``metrics``: the phase's metrics of that step (explained variance before the update);
- ``curve``: ``critic/explained_variance`` and ``critic/value_loss`` of ``--steps`` further
  ``PolicyUpdate.update`` calls on the same rows during ``critic_warmup_steps`` (the critic
  alone learns), where the reward is a function of the prompt the critic sees;
- ``moved``: how far the critic's trunk and head moved over those updates.
"""

import argparse
import json
import random
from pathlib import Path

import torch
from train_parity import ARCHS

from hpt_megatron.config.algorithm import CriticConfig
from hpt_megatron.config.presets import get_preset
from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.data.sample import Sample
from hpt_megatron.models.provider import load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.build import build_policy
from hpt_megatron.trainer.critic import Critic, build_critic, critic_phase, init_critic_weights
from hpt_megatron.trainer.update import (
    PolicyUpdate,
    UpdateLayout,
    dp_shards,
    gradient_rows,
    local_microbatches,
    split_groups,
)


def make_rows(seed: int = 0) -> list[Sample]:
    """8 prompts x 2 responses; the reward is 1 when the prompt's first token is even."""
    rng = random.Random(seed)
    rows = []
    for g in range(8):
        prompt = [2 * rng.randrange(1, 120) + g % 2 for _ in range(rng.randrange(3, 7))]
        for _ in range(2):
            response = [rng.randrange(1, 250) for _ in range(rng.randrange(2, 9))]
            reward = 1.0 if prompt[0] % 2 == 0 else 0.0
            rows.append(
                Sample(
                    prompt_id=str(g),
                    group_id=g,
                    prompt_ids=prompt,
                    response_ids=response,
                    reward=reward,
                )
            )
    return rows


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    parallel = ParallelConfig(backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    arch = ARCHS["llama"]
    model_cfg, hf = ModelConfig(inline=arch), load_hf_config(arch)
    total = args.steps + 1
    policy = build_policy(hf, model_cfg, parallel, TrainerConfig(lr=1e-4), ctx, total_steps=total)
    cfg = CriticConfig(lr=1e-3, critic_warmup_steps=total)
    trainer = TrainerConfig()
    critic = build_critic(hf, model_cfg, parallel, trainer, cfg, ctx, total_steps=total)
    init_critic_weights(critic, policy, cfg)

    mine, theirs = unwrap(critic.model_chunks[0]), unwrap(policy.model_chunks[0])
    policy_state = theirs.state_dict()
    trunk = {k: v for k, v in mine.named_parameters() if not k.startswith("output_layer.")}
    trunk_equal = all(torch.equal(v, policy_state[k]) for k, v in trunk.items())
    head = mine.output_layer
    head_zero = bool((head.weight == 0).all() and (head.bias == 0).all())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        head.weight.copy_(0.5 * torch.randn(head.weight.shape, generator=gen))
        head.bias.fill_(0.2)

    rows = make_rows()
    plain = {}
    with torch.no_grad():
        mine.eval()
        for i, s in enumerate(rows):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            positions = torch.arange(ids.shape[1])[None]
            plain[i] = mine(ids, positions, None)[0, :, 0].tolist()
        mine.train()

    # One step's critic phase exactly as PolicyUpdate.update runs it (one mini-batch, one epoch).
    spec = get_preset("ppo")
    layout = UpdateLayout()
    minis = split_groups(rows, layout.mini_batches)
    kept = [gradient_rows(spec, mini)[0] for mini in minis]
    local = [local_microbatches(mini, layout) for mini in kept]
    owned = [bool(dp_shards(mini, layout.dp)[layout.dp_rank]) for mini in kept]
    metrics = critic_phase(critic, cfg, spec, kept, local, owned, layout.epochs, None)
    written = {}
    for k, microbatches in enumerate(local):
        for mb in microbatches:
            mask_bs = mb.loss_mask_bs.bool()
            assert mb.old_values_bs is not None and mb.returns_bs is not None
            for row, idx in enumerate(mb.sample_index_b):
                sample = kept[k][idx]
                written[rows.index(sample)] = {
                    "values": mb.old_values_bs[row][mask_bs[row]].tolist(),
                    "returns": mb.returns_bs[row][mask_bs[row]].tolist(),
                    "advantages": mb.advantages_bs[row][mask_bs[row]].tolist(),
                    "returns_off_response": float(mb.returns_bs[row][~mask_bs[row]].abs().sum()),
                    "advantages_off_response": float(
                        mb.advantages_bs[row][~mask_bs[row]].abs().sum()
                    ),
                }

    # The critic alone learns (its warm-up) from the same rows through PolicyUpdate.update.
    start = {k: v.detach().clone() for k, v in mine.named_parameters()}
    update = PolicyUpdate(policy, layout, critic=Critic(critic, cfg))
    curve = []
    for step in range(args.steps):
        out = update.update([dict_copy(s) for s in rows], spec, step=step)
        curve.append({k: out[k] for k in ("critic/explained_variance", "critic/value_loss")})
        assert out.get("train/critic_warmup") == 1.0
    moved = {"trunk": 0.0, "head": 0.0}
    for k, v in mine.named_parameters():
        part = "head" if k.startswith("output_layer.") else "trunk"
        moved[part] = max(moved[part], float((v.detach() - start[k]).abs().max()))
    if ctx.rank == 0:
        rows_out = [
            {
                "prompt_len": len(s.prompt_ids),
                "response_len": len(s.response_ids),
                "reward": s.reward,
                "plain": plain[i],
                **written[i],
            }
            for i, s in enumerate(rows)
        ]
        Path(args.out).write_text(
            json.dumps(
                {
                    "trunk_equal": trunk_equal,
                    "head_zero": head_zero,
                    "rows": rows_out,
                    "metrics": metrics,
                    "curve": curve,
                    "moved": moved,
                }
            )
        )
    shutdown_distributed()


def dict_copy(sample: Sample) -> Sample:
    """A fresh copy (the update writes advantages into its samples' micro-batches only)."""
    return Sample(**sample.to_dict())


if __name__ == "__main__":
    main()
