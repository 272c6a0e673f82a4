"""Converter throughput and peak memory on a random model of Qwen2.5-0.5B's shape, or a random
Qwen3-MoE of about 1 GB (``--model qwen3-moe``: 12 layers of 32 experts, per-expert tensors).

    python benchmarks/convert_throughput.py [--model qwen2.5-0.5b|qwen3-moe] [--dtype bf16|fp32]
        [--rounds 3] [--workdir DIR]

Writes a random HF folder (safetensors shards; Qwen2.5-0.5B: tied embeddings, vocab 151,936;
the MoE: untied, vocab 32,000, 2,304 expert tensors of 0.75 MiB in bf16), then times, each
in its own process: a plain safetensors read-and-write of the same files (the baseline),
``hf-to-megatron`` and ``megatron-to-hf``. The three run in turn for ``--rounds`` rounds, each
writing new files after an ``os.sync()`` (so one run's dirty pages do not slow the next); the
throughput ratio to the baseline is the median over rounds of that round's ratio. Peak resident
memory (VmHWM, and VmHWM minus the resident size after imports; the largest over rounds) is given
as a ratio to the largest single tensor plus one 512 MiB bucket.

On a shared machine the time to write a GB into a disk's page cache swings several-fold from one
run to the next, whatever writes it; ``--workdir /dev/shm/...`` (tmpfs, needs ~4x the model in
free memory) takes the disk out and measures what the converter itself does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
QWEN25_05B = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "use_sliding_window": False,
}
# A Qwen3-30B-A3B-like layout scaled to ~1.1 GB in bf16: most bytes are in small expert tensors.
QWEN3_MOE_1G = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 384,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
MODELS = {"qwen2.5-0.5b": QWEN25_05B, "qwen3-moe": QWEN3_MOE_1G}
BUCKET = 512 * 1024**2

# Runs in a child process: import first, then measure only the work.
_HARNESS = """
import json, sys, time
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
mode, args = sys.argv[1], sys.argv[2:]
if mode == "baseline":
    from safetensors.torch import load_file, save_file
    import pathlib
else:
    import torch, megatron.core.models.gpt, megatron.core.dist_checkpointing
    from hpt_megatron import convert
    # the modules the converter imports when it runs, so that only the work is timed
    import hpt_megatron.models.torch_dist, hpt_megatron.models.torch_dist_reader
    import hpt_megatron.models.provider
    import hpt_megatron.parallel.runtime, megatron.core.models.gpt.gpt_layer_specs
base = rss("VmRSS")
t0 = time.perf_counter()
if mode == "baseline":
    src, dst = pathlib.Path(args[0]), pathlib.Path(args[1])
    dst.mkdir(parents=True, exist_ok=True)
    for shard in sorted(src.glob("*.safetensors")):
        save_file(load_file(shard), dst / shard.name)
else:
    assert convert.main(args) == 0
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": rss("VmHWM"), "base": base}))
"""


def moe_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    h, v, d = hf["hidden_size"], hf["vocab_size"], hf["head_dim"]
    q, kv = hf["num_attention_heads"] * d, hf["num_key_value_heads"] * d
    f = hf["moe_intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate.weight": (hf["num_experts"], h),
        }
        for e in range(hf["num_experts"]):
            x = f"{p}mlp.experts.{e}."
            shapes |= {
                x + "gate_proj.weight": (f, h),
                x + "up_proj.weight": (f, h),
                x + "down_proj.weight": (h, f),
            }
    return shapes


def hf_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    if hf.get("num_experts"):
        return moe_shapes(hf)
    h, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    d = h // hf["num_attention_heads"]
    kv = hf["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
    }
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    return shapes


def write_random_hf(folder: Path, dtype: torch.dtype, config: dict) -> tuple[int, int]:
    """Random weights in ~1 GB safetensors shards; returns (total bytes, largest tensor bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weight_map, shard, size, n, total, largest = {}, {}, 0, 0, 0, 0
    items = list(hf_shapes(config).items())
    for i, (name, shape) in enumerate(items):
        shard[name] = (torch.randn(shape) * 0.02).to(dtype)
        nbytes = shard[name].numel() * shard[name].element_size()
        size, total, largest = size + nbytes, total + nbytes, max(largest, nbytes)
        if size > 2 * BUCKET or i == len(items) - 1:
            n += 1
            save_file(shard, folder / f"model-{n:05d}.safetensors", metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, f"model-{n:05d}.safetensors")
            shard, size = {}, 0
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype_name}))
    return total, largest


def run(mode: str, *args: str) -> dict:
    os.sync()
    env_cmd = [sys.executable, "-c", _HARNESS, mode, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(env_cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-0.5b")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="default: a temporary folder")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert-bench-"))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    total, largest = write_random_hf(work / "hf", dtype, MODELS[args.model])
    hf_dir = str(work / "hf")
    results: dict[str, list[dict]] = {"baseline": [], "hf-to-megatron": [], "megatron-to-hf": []}
    mg_dir, back, copy = str(work / "mg"), str(work / "back"), str(work / "copy")
    commands = {
        "baseline": ("baseline", hf_dir, copy),
        "hf-to-megatron": ("convert", "hf-to-megatron", "--hf", hf_dir, "--out", mg_dir),
        "megatron-to-hf": ("convert", "megatron-to-hf", "--load", mg_dir, "--out", back),
    }
    for _ in range(args.rounds):
        for name, command in commands.items():
            # Each run first frees its own previous output, so all three write into memory the
            # kernel has just released (fresh pages cost far more, on disk and on tmpfs alike).
            shutil.rmtree(command[-1], ignore_errors=True)
            flags = ("--no-progress",) if command[0] == "convert" else ()
            results[name].append(run(*command, *flags))
    bound = largest + BUCKET
    print(
        f"{args.model}: model bytes {total / 2**20:.0f} MiB ({args.dtype}); largest tensor "
        f"{largest / 2**20:.0f} MiB; largest + bucket {bound / 2**20:.0f} MiB; "
        f"{args.rounds} rounds"
    )
    for name, rs in results.items():
        secs = statistics.median(r["seconds"] for r in rs)
        base = results["baseline"]
        ratio = statistics.median(b["seconds"] / r["seconds"] for b, r in zip(base, rs))
        each = " ".join(f"{r['seconds']:.2f}" for r in rs)
        peak = max(r["peak"] for r in rs)
        above = max(r["peak"] - r["base"] for r in rs)
        print(
            f"{name:15s} median {secs:6.2f} s ({total / secs / 2**20:6.0f} MiB/s; rounds "
            f"{each}) throughput ratio {ratio:.2f} | "
            f"peak RSS {peak / 2**20:5.0f} MiB = {peak / bound:.2f} x bound, above imports "
            f"{above / 2**20:5.0f} MiB = {above / bound:.2f} x"
        )


if __name__ == "__main__":
    main()
