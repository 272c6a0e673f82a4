"""Disk weight sync at one TP/PP layout, into a real in-process CPU engine on the driver.

    torchrun ... weight_sync_disk.py --tp 2 --pp 1 --hf DIR --root DIR

Every rank loads the HF folder ``--hf`` into its Megatron chunks and takes part in
``DiskPusher(root, ...).push`` twice (versions 1 and 2, the parameters shifted by +1
in between). The driver's sink is an ``HFCpuEngine`` built with other (random) weights, which
loads each version folder from disk. The driver prints one JSON line: the files of each version
folder, the biggest difference between the engine's tensors and the exported policy after each
version, and the byte count ``push`` returned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hpt_megatron.config.sections import ModelConfig, ParallelConfig
from hpt_megatron.models.hf_io import HFCheckpointReader
from hpt_megatron.models.loading import load_hf_weights
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.rollout.weight_sync.disk import DiskPusher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    ctx = init_distributed(parallel)
    hf = load_hf_config(args.hf)
    chunks = build_model_chunks(
        hf, ModelConfig(inline=hf.to_dict()), parallel, pp_rank=ctx.pp_rank, init_weights=False
    )
    load_hf_weights(chunks, hf, args.hf, tp_rank=ctx.tp_rank, tp_size=ctx.tp)
    engine = None
    if ctx.is_driver:
        from transformers import AutoModelForCausalLM

        from hpt_megatron.rollout.cpu_engine import HFCpuEngine

        torch.manual_seed(123)  # other weights than the trainer's
        engine = HFCpuEngine(AutoModelForCausalLM.from_config(hf.to_transformers()))
    disk = DiskPusher(Path(args.root), chunks, hf, ctx, bucket_bytes=4096)
    report: dict = {"files": {}, "max_diff": {}, "bytes": {}}
    original = HFCheckpointReader(args.hf)
    for version, shift in ((1, 0.0), (2, 1.0)):
        with torch.no_grad():
            for chunk in chunks:
                for param in chunk.parameters():
                    param.add_(shift)
        got = disk.push(version, engine)
        if engine is not None:
            folder = disk.root / f"v{version}"
            report["files"][version] = sorted(p.name for p in folder.iterdir())
            report["bytes"][version] = got
            state = engine.model.state_dict()
            diff = 0.0
            for name in original.weight_map:
                want = original.get(name).float() + (shift if version == 2 else 0.0)
                diff = max(diff, (state[name].float() - want).abs().max().item())
            report["max_diff"][version] = diff
            assert engine.weight_version == version
    if ctx.is_driver:
        print(json.dumps(report), flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
