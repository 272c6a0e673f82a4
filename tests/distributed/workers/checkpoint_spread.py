"""Worker (DP=2): two periodic background saves through the ``Checkpointer``, each followed at once
by a training step while the snapshot (slowed down) is still being taken. Writes JSON (rank 0)
with the bytes each rank's manifest lists, whether the second save reused the first one's
snapshot buffers, how long the updates waited for the snapshots, and whether a fresh engine
that loads the checkpoint holds the weights and Adam moments of the step saved."""

import argparse
import json
import time
from pathlib import Path

import torch
from nll_loss import TokenMeanNLL
from train_parity import ARCHS, make_samples

from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.batching import collate, token_budget_microbatches
from hpt_megatron.trainer.build import build_engine
from hpt_megatron.trainer.checkpoint import Checkpointer
from hpt_megatron.trainer.checkpoint_files import load_checkpoint


def _engine(ctx, parallel, seed: int):
    torch.manual_seed(seed)
    hf = load_hf_config(ARCHS["llama"])
    chunks = build_model_chunks(hf, ModelConfig(inline=ARCHS["llama"]), parallel, pp_rank=0)
    return build_engine(chunks, ctx, TrainerConfig(lr=1e-3, max_tokens_per_microbatch=64), 10)


def _state(engine) -> list[torch.Tensor]:
    """The weights and Adam moments, in parameter order."""
    out = []
    opt = engine.optimizer.optimizer
    for chunk in engine.model_chunks:
        for p in chunk.parameters():
            out.append(p.detach().clone())
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            out += [state[k].detach().clone() for k in ("exp_avg", "exp_avg_sq") if k in state]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    parallel = ParallelConfig(tp=1, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    engine = _engine(ctx, parallel, seed=0)
    samples = make_samples()
    total = sum(len(s.response_ids) for s in samples)
    lengths = [s.num_tokens for s in samples]
    batches = [collate(samples, group) for group in token_budget_microbatches(lengths, 64)]
    root = Path(args.root)
    ckpt = Checkpointer(root, ctx, save_every=1, keep_last=2, last_step=100, background=True)
    copy = ckpt.buffers.copy

    def slow_copy(tensor: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)  # a snapshot still being taken when the next update comes
        return copy(tensor)

    ckpt.buffers.copy = slow_copy
    pointers = []
    for step in (1, 2):
        engine.train_step(batches, TokenMeanNLL(total))
        ckpt.maybe_save(step, engine, None, {})
        saved = _state(engine)  # what the save snapshot holds
        engine.train_step(batches, TokenMeanNLL(total))  # trains while the shards are written
        while not ckpt.pending.done():
            time.sleep(0.01)
        ckpt.poll()
        pointers.append(sorted(b.data_ptr() for free in ckpt.buffers._free.values() for b in free))
    fresh = _engine(ctx, parallel, seed=7)
    load_checkpoint(root / "step_000002", fresh.model_chunks, fresh.optimizer)
    loaded = _state(fresh)
    same = len(loaded) == len(saved) and all(torch.equal(a, b) for a, b in zip(loaded, saved))
    if ctx.rank == 0:
        written = {}
        for rank in (0, 1):
            entries = json.loads((root / "step_000002" / f"manifest_{rank}.json").read_text())
            written[rank] = sum(size for name, (size, _) in entries.items() if ".distcp" in name)
        result = {
            "written_bytes": written,
            "buffers_reused": bool(pointers[0]) and pointers[0] == pointers[1],
            "loaded_equals_saved": same,
            "tensors": len(saved),
            "staging_wait_s": ckpt.take_staging_wait(),
        }
        Path(args.out).write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
