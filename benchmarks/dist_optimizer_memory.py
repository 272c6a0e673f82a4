"""Peak host memory per rank with and without the distributed optimizer, at DP=2 on CPU.

Each setting runs in a fresh pair of gloo ranks (``torch.distributed.run``): a Llama-style model
(defaults: hidden 768, 6 layers, FFN 2048, vocabulary 32,000: about 92M parameters) with the
paper configs' precision (``--dtype bf16``: bf16 weights, fp32 gradient buffers, fp32 main
weights and Adam moments; ``fp32``: fp32 weights, main weights the same tensors), Megatron DDP
and optimizer as ``trainer/build.py`` wires them, ``--steps`` training steps on a small batch
(Adam's state exists from the first step). A rank reports its peak resident set size (``ru_maxrss``)
and that peak minus its resident size before the model was built (the training state: weights,
gradient buffers, optimizer state, activations, the collectives' buffers), with the same figure
at the end of the model's build and after the first step, and what stays resident between
steps (``VmRSS`` after the last step, the heap trimmed). The distributed
optimizer shards the fp32 main weights and Adam moments over the data-parallel ranks, so at DP=2
a rank holds half of them: with bf16 a parameter needs 2 (weight) + 4 (fp32 gradient) + 4 (main
weight) + 8 (Adam) = 18 bytes without it and 2 + 4 + 6 = 12 with it (0.67); with fp32, where the
main weights are the model's, 16 and 12 (0.75). The script prints that expectation beside the
measurement. The resident figure meets it; the peak stays above it because gloo stages each
collective through a temporary the size of the tensor it fills or reads (the parameter
all-gather's output, the gradient reduce-scatter's input: ``gloo_collective_memory.py``),
which NCCL does not.

    python benchmarks/dist_optimizer_memory.py                 # bf16, the defaults
    python benchmarks/dist_optimizer_memory.py --dtype fp32 --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys

MB = 2**20
TAG = "DIST_OPT_MEMORY "


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def worker(args: argparse.Namespace) -> None:
    import torch

    from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
    from hpt_megatron.data.sample import Sample
    from hpt_megatron.models.provider import build_model_chunks, load_hf_config
    from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
    from hpt_megatron.trainer.batching import collate
    from hpt_megatron.trainer.build import build_engine

    arch = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    parallel = ParallelConfig(tp=1, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    model = ModelConfig(inline=arch, params_dtype=args.dtype, transformer_impl="local")
    trainer = TrainerConfig(lr=1e-4, use_distributed_optimizer=args.dist_opt == "on")
    hf = load_hf_config(arch)
    before = _rss()
    chunks = build_model_chunks(hf, model, parallel, pp_rank=0)
    engine = build_engine(chunks, ctx, trainer, total_steps=args.steps, vocab_size=hf.vocab_size)
    gen = torch.Generator().manual_seed(ctx.dp_rank)
    samples = [
        Sample(
            prompt_id=str(i),
            group_id=i,
            prompt_ids=torch.randint(1, args.vocab, (16,), generator=gen).tolist(),
            response_ids=torch.randint(1, args.vocab, (16,), generator=gen).tolist(),
        )
        for i in range(2)
    ]
    batch = [collate(samples, [0, 1])]

    def nll(logprobs_bs, entropy_bs, mb):
        mask = mb.loss_mask_bs
        return -(logprobs_bs * mask).sum() / (mask.sum() * ctx.dp), {"tokens": mask.sum()}

    built = _peak()
    engine.train_step(batch, nll)
    first = _peak()
    for _ in range(args.steps - 1):
        engine.train_step(batch, nll)
    params = sum(p.numel() for chunk in engine.model_chunks for p in chunk.parameters())
    gc.collect()
    with contextlib.suppress(OSError):  # heap the transients left behind, back to the system
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    report = {
        "resident_mb": (_rss() - before) / MB,  # what stays held between steps
        "rank": ctx.rank,
        "params": params,
        "peak_mb": _peak() / MB,
        "state_mb": (_peak() - before) / MB,
        "built_mb": (built - before) / MB,  # the peak up to the end of the model's build
        "step1_mb": (first - before) / MB,
    }
    print(TAG + json.dumps(report), flush=True)
    shutdown_distributed()


def measure(dist_opt: str, args: argparse.Namespace) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={args.port}", __file__, "--worker"]
    cmd += ["--dist-opt", dist_opt, "--dtype", args.dtype, "--hidden", str(args.hidden)]
    cmd += ["--layers", str(args.layers), "--ffn", str(args.ffn), "--vocab", str(args.vocab)]
    cmd += ["--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    lines = [ln[len(TAG) :] for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    return sorted((json.loads(ln) for ln in lines), key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=2, help="training steps (Adam's state: 1)")
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dist-opt", choices=["on", "off"], default="off", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    runs = {setting: measure(setting, args) for setting in ("off", "on")}
    params = runs["off"][0]["params"]
    print(f"DP=2, {args.dtype}, {params / 1e6:.1f}M parameters")
    print(
        f"{'distributed optimizer':22} {'rank':>4} {'peak RSS MB':>12} {'state MB':>9} "
        f"{'of it: built':>12} {'step 1':>7} {'resident':>9}"
    )
    for setting, reports in runs.items():
        for r in reports:
            print(
                f"{setting:22} {r['rank']:>4} {r['peak_mb']:12.0f} {r['state_mb']:9.0f} "
                f"{r['built_mb']:12.0f} {r['step1_mb']:7.0f} {r['resident_mb']:9.0f}"
            )
    full, sharded = (18, 12) if args.dtype == "bf16" else (16, 12)
    print(
        f"weights + gradients + optimizer state: {params * full / MB:.0f} MB without, "
        f"{params * sharded / MB:.0f} MB with ({sharded / full:.2f})"
    )
    worst = {s: max(r["state_mb"] for r in reports) for s, reports in runs.items()}
    peaks = {s: max(r["peak_mb"] for r in reports) for s, reports in runs.items()}
    held = {s: max(r["resident_mb"] for r in reports) for s, reports in runs.items()}
    print(
        f"per rank, with / without: training state {worst['on'] / worst['off']:.2f} "
        f"({worst['off']:.0f} -> {worst['on']:.0f} MB), peak RSS {peaks['on'] / peaks['off']:.2f}, "
        f"resident between steps {held['on'] / held['off']:.2f} "
        f"({held['off']:.0f} -> {held['on']:.0f} MB)"
    )


if __name__ == "__main__":
    main()
