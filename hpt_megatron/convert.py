"""Convert checkpoints between Hugging Face folders and Megatron distributed checkpoints.

    python tools/convert.py hf-to-megatron --hf HF_DIR --out MEGATRON_DIR [--tp N --pp N]
        [--dtype bf16|fp16|fp32]
    python tools/convert.py megatron-to-hf --load MEGATRON_DIR --out HF_DIR [--hf-config DIR]

Both directions stream one tensor at a time through the model of one layout (TP=PP=1 in a plain
``python`` process; any layout under ``torchrun`` with ``--tp``/``--pp``), so the model is held
once. The Megatron checkpoint (torch_dist format) loads at any TP/PP layout; the output folder
also gets the HF ``config.json`` and tokenizer files, so a run needs nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/convert.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_mg = sub.add_parser("hf-to-megatron", help="HF folder -> Megatron distributed checkpoint")
    to_mg.add_argument("--hf", required=True, help="HF folder: config.json + safetensors")
    to_mg.add_argument("--out", required=True, help="new (empty) checkpoint folder")
    to_mg.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: config's")
    to_hf = sub.add_parser("megatron-to-hf", help="Megatron distributed checkpoint -> HF folder")
    to_hf.add_argument("--load", required=True, help="checkpoint folder")
    to_hf.add_argument("--out", required=True, help="HF folder to write")
    to_hf.add_argument("--hf-config", help="folder with config.json (default: the checkpoint's)")
    to_hf.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: checkpoint's")
    to_hf.add_argument("--shard-mib", type=int, default=512, help="safetensors shard size")
    for p in (to_mg, to_hf):
        p.add_argument("--tp", type=int, default=1, help="layout used while converting")
        p.add_argument("--pp", type=int, default=1)
        p.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _hf_dtype(hf: dict[str, Any]) -> str:
    return _DTYPE_NAMES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "float32"), "fp32")


def hf_to_megatron(args: argparse.Namespace) -> None:
    """HF folder -> torch_dist checkpoint + config.json + tokenizer files."""
    from hpt_megatron.config.sections import ModelConfig, ParallelConfig
    from hpt_megatron.models.checkpoint import save_model_checkpoint
    from hpt_megatron.models.hf_io import HFCheckpointReader, copy_side_files, write_config
    from hpt_megatron.models.loading import load_hf_weights
    from hpt_megatron.models.provider import build_model_chunks, check_hf_supported, load_hf_config
    from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed

    hf = load_hf_config(args.hf)
    check_hf_supported(hf)
    HFCheckpointReader(args.hf)  # fail early on a missing index or shard
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: folder is not empty")
    dtype = args.dtype or _hf_dtype(hf)
    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    ctx = init_distributed(parallel)
    model = ModelConfig(inline=hf, params_dtype=dtype)
    chunks = build_model_chunks(hf, model, parallel, pp_rank=ctx.pp_rank, init_weights=False)
    show = ctx.is_driver and not args.no_progress
    load_hf_weights(chunks, hf, args.hf, tp_rank=ctx.tp_rank, tp_size=ctx.tp, progress=show)
    save_model_checkpoint(chunks, out, meta={"params_dtype": dtype, "source": str(args.hf)})
    if ctx.is_driver:
        write_config(hf, out)
        copy_side_files(args.hf, out)
        print(f"wrote Megatron checkpoint {out} ({dtype})")
    shutdown_distributed()


def megatron_to_hf(args: argparse.Namespace) -> None:
    """torch_dist checkpoint -> HF folder (sharded safetensors + index, config, tokenizer)."""
    import json

    from hpt_megatron.config.sections import ModelConfig, ParallelConfig
    from hpt_megatron.models.checkpoint import META_FILE, load_model_checkpoint
    from hpt_megatron.models.export import save_hf_folder
    from hpt_megatron.models.hf_io import copy_side_files
    from hpt_megatron.models.provider import build_model_chunks, load_hf_config
    from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed

    hf = load_hf_config(args.hf_config or args.load)
    meta_path = Path(args.load) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    dtype = args.dtype or meta.get("params_dtype") or _hf_dtype(hf)
    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    ctx = init_distributed(parallel)
    model = ModelConfig(inline=hf, params_dtype=dtype)
    chunks = build_model_chunks(hf, model, parallel, pp_rank=ctx.pp_rank, init_weights=False)
    load_model_checkpoint(chunks, args.load)
    save_hf_folder(chunks, hf, args.out, ctx, torch_dtype=_TORCH_DTYPES[dtype],
                   bucket_bytes=args.shard_mib * 1024**2,
                   progress=ctx.is_driver and not args.no_progress)  # fmt: skip
    if ctx.is_driver:
        copy_side_files(args.load, args.out)
        print(f"wrote HF folder {args.out} ({dtype})")
    shutdown_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/convert.py`` and ``hpt convert``; returns the exit status."""
    args = _parse(argv)
    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron(args)
        else:
            megatron_to_hf(args)
    except ValueError as err:  # ConfigError included: a user error, named by its message
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
