"""Time the training loop is blocked by a checkpoint: the asynchronous save (shards written in a
thread, per-rank checksums) against the save as it was before it (synchronous Megatron save, then
rank 0 reading back every rank's files to checksum them), on a Qwen2.5-0.5B-shaped model with its
Adam state at DP=2.

    torchrun --nproc_per_node 2 benchmarks/checkpoint_blocking.py [--layers 24] [--rounds 3]
        [--workdir DIR]

Both ranks build the model from a config (hidden 896, 14 heads, 2 KV heads, intermediate 4864,
vocab 151,936, tied embeddings; ``--layers`` of the 24, fewer to fit memory), take one optimizer
step so the Adam moments exist, then each round saves once per mode, in turn:

- ``legacy``: what ``save_checkpoint`` did before: Megatron's synchronous torch_dist save,
  then rank 0 checksums every file of the checkpoint (all ranks wait at the barrier);
- ``sync``: ``checkpoint.async_save: false`` now: the shards written before returning, each rank
  checksumming its own files;
- ``async``: ``checkpoint.async_save: true``: blocked = the call that starts the save, the time
  the next step's update waited for the snapshot (taken in the writer thread meanwhile), and
  the collective completion after the writer threads finish (measured after a training step
  ran meanwhile; the step's time against an undisturbed one is reported too).

Reports the medians over rounds (rank 0, JSON on stdout) and the ratio async / legacy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}


class _NLL:
    def __call__(self, logprobs_bs, entropy_bs, mb):
        mask = mb.loss_mask_bs.to(logprobs_bs.device)
        loss = -(logprobs_bs * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"loss": loss.detach()}


def _batch(step: int):
    from hpt_megatron.data.sample import Sample
    from hpt_megatron.trainer.batching import collate

    g = torch.Generator().manual_seed(step)
    samples = [
        Sample(
            prompt_id=str(i),
            group_id=i,
            prompt_ids=torch.randint(0, 151000, (32,), generator=g).tolist(),
            response_ids=torch.randint(0, 151000, (32,), generator=g).tolist(),
            advantage=1.0,
        )
        for i in range(2)
    ]
    return [collate(samples, [0, 1])]


def _legacy_save(path: Path, engine, group) -> None:
    """The save before this change: synchronous, then rank 0 reads back every file."""
    from megatron.core import dist_checkpointing

    from hpt_megatron.trainer.checkpoint_files import flat_model_state, sharded_model

    tmp = path.with_name(path.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=group)
    model_sd = sharded_model(engine.model_chunks)
    optimizer_sd = engine.optimizer.sharded_state_dict(flat_model_state(model_sd))
    sharded = {"model": model_sd, "optimizer": optimizer_sd}
    dist_checkpointing.save(sharded, str(tmp))
    dist.barrier(group=group)
    if dist.get_rank() == 0:
        entries = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            crc = 0
            with open(file, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            entries[file.name] = [file.stat().st_size, crc]
        (tmp / "manifest.json").write_text(json.dumps(entries))
        (tmp / "COMPLETE").write_text("ok\n")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier(group=group)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
    from hpt_megatron.models.provider import load_hf_config
    from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
    from hpt_megatron.trainer.build import build_policy
    from hpt_megatron.trainer.checkpoint import Checkpointer

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    parallel = ParallelConfig(tp=1, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    inline = {**QWEN25_05B, "num_hidden_layers": args.layers}
    hf = load_hf_config(inline)
    trainer = TrainerConfig(lr=1e-5, max_tokens_per_microbatch=4096)
    engine = build_policy(hf, ModelConfig(inline=inline), parallel, trainer, ctx, total_steps=100)
    params = sum(p.numel() for c in engine.model_chunks for p in c.parameters())
    root = Path(args.workdir or tempfile.gettempdir()) / "hpt_ckpt_bench"
    root = Path(ctx_broadcast(ctx, str(root)))
    if ctx.is_driver:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    loss = _NLL()

    def step(i: int) -> float:
        t0 = time.perf_counter()
        engine.train_step(_batch(i), loss)
        return time.perf_counter() - t0

    step(0)  # the Adam moments exist from here on
    plain = [step(i) for i in range(1, 3)]
    group = ctx.cpu_group
    times: dict[str, list[float]] = {"legacy": [], "sync": [], "async": [], "async_step": []}
    sizes = 0
    # One checkpointer per mode for the whole run, as in a training run (a background save
    # reuses its snapshot's host memory from the previous save).
    sync = Checkpointer(
        root / "sync", ctx, save_every=1, keep_last=1, last_step=10**9, background=False
    )
    ckpt = Checkpointer(
        root / "async", ctx, save_every=1, keep_last=1, last_step=10**9, background=True
    )
    for r in range(args.rounds):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        _legacy_save(root / f"legacy_{r}", engine, group)
        times["legacy"].append(time.perf_counter() - t0)

        dist.barrier(group=group)
        t0 = time.perf_counter()
        sync.maybe_save(r + 1, engine, None, {})
        times["sync"].append(time.perf_counter() - t0)

        dist.barrier(group=group)
        t0 = time.perf_counter()
        ckpt.maybe_save(r + 1, engine, None, {})
        blocked = time.perf_counter() - t0
        times["async_step"].append(step(10 + r))  # trains while the shards are written
        while ckpt.pending is not None and not ckpt.pending.done():
            time.sleep(0.01)  # (a real loop trains more steps here)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        ckpt.poll()  # the collective completion: Megatron's metadata, manifests, COMPLETE
        blocked += time.perf_counter() - t0
        blocked += ckpt.take_staging_wait()  # the step's update waiting for the snapshot
        times["async"].append(blocked)
        if ctx.is_driver:
            sizes = sum(p.stat().st_size for p in (root / f"legacy_{r}").rglob("*"))
            shutil.rmtree(root / f"legacy_{r}", ignore_errors=True)
        dist.barrier(group=group)
    if ctx.is_driver:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "layers": args.layers,
                    "params": params,
                    "checkpoint_bytes": sizes,
                    "rounds": args.rounds,
                    "blocked_s": {k: round(med[k], 3) for k in ("legacy", "sync", "async")},
                    "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                    "ratio_async_to_legacy": round(med["async"] / med["legacy"], 3),
                    "ratio_sync_to_legacy": round(med["sync"] / med["legacy"], 3),
                    "train_step_s": {
                        "undisturbed": round(statistics.median(plain), 3),
                        "during_async_write": round(med["async_step"], 3),
                    },
                },
                indent=1,
            )
        )
    shutdown_distributed()


def ctx_broadcast(ctx, value):
    from hpt_megatron.parallel.runtime import broadcast_from_driver

    return broadcast_from_driver(ctx, value)


if __name__ == "__main__":
    main()
