"""Convert checkpoints between Hugging Face folders and Megatron distributed checkpoints.

    python tools/convert.py hf-to-megatron --hf HF_DIR --out MEGATRON_DIR [--dtype bf16|fp16|fp32]
    python tools/convert.py megatron-to-hf --load MEGATRON_DIR --out HF_DIR [--hf-config DIR]
    python tools/convert.py critic-to-hf --load RUN/checkpoints/critic/step_N --out HF_DIR

One process, no model: both directions stream one tensor (one layer of one parameter) at a time
between safetensors and the torch_dist files, so memory stays near the largest tensor plus one
output shard. The Megatron checkpoint (torch_dist format, the layout Megatron writes for TP=PP=1)
loads at any TP/PP layout; ``megatron-to-hf`` reads checkpoints written at any layout, training
checkpoints included (their optimizer state is skipped). The output folder also gets the HF
``config.json`` and tokenizer files, so a run needs nothing else.

``critic-to-hf`` writes a PPO run's critic (``checkpoints/critic/step_N``, any layout) as an HF
``*ForTokenClassification`` folder with one label, the value of each position; it builds the
value model in this process (memory: the model once) and takes the config and tokenizer from the
policy checkpoint of the same step unless ``--hf-config`` names another folder.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpt_megatron.config.sections import ParamsDtype
    from hpt_megatron.models.hf_config import HFModelConfig

_DTYPE_NAMES: dict[str, ParamsDtype] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
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
    critic = sub.add_parser("critic-to-hf", help="a PPO run's critic checkpoint -> HF folder")
    critic.add_argument("--load", required=True, help="<run>/checkpoints/critic/step_N")
    critic.add_argument("--out", required=True, help="HF folder to write")
    critic.add_argument("--hf-config", help="folder with config.json (default: the policy's)")
    for p in (to_mg, to_hf, critic):
        p.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _hf_dtype(hf: HFModelConfig) -> ParamsDtype:
    return _DTYPE_NAMES.get(hf.torch_dtype or "float32", "fp32")


def _freeze_imports() -> None:
    """Call after the imports: what exists now is long-lived, so keep the cyclic garbage collector
    from walking it again and again (a full pass over Megatron's and torch's modules took 0.15 s,
    a fifth of a 1 GB conversion). ``main`` unfreezes."""
    gc.freeze()


def _check_one_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "the converter runs in one process and needs no model layout: "
            "start it with python, not torchrun (the checkpoint loads at any TP/PP)"
        )


def hf_to_megatron(args: argparse.Namespace) -> None:
    """HF folder -> torch_dist checkpoint + config.json + tokenizer files."""
    import json

    from hpt_megatron.config.sections import ParallelConfig
    from hpt_megatron.models.checkpoint import META_FILE
    from hpt_megatron.models.hf_io import HFCheckpointReader, copy_side_files, write_config
    from hpt_megatron.models.provider import check_hf_supported, load_hf_config
    from hpt_megatron.models.torch_dist import megatron_schema, write_checkpoint_from_hf
    from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed

    _check_one_process()
    _freeze_imports()
    hf = load_hf_config(args.hf)
    check_hf_supported(hf)
    HFCheckpointReader(args.hf)  # fail early on a missing index or shard
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: folder is not empty")
    dtype = args.dtype or _hf_dtype(hf)
    init_distributed(ParallelConfig())  # Megatron's parallel state, for the model's schema
    try:
        schema = megatron_schema(hf, dtype)
    finally:
        shutdown_distributed()
    _freeze_imports()  # again: building the schema imported most of Megatron
    write_checkpoint_from_hf(
        hf, args.hf, out, dtype=dtype, schema=schema, progress=not args.no_progress
    )
    meta = {"params_dtype": dtype, "source": str(args.hf)}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    write_config(hf, out)
    copy_side_files(args.hf, out)
    print(f"wrote Megatron checkpoint {out} ({dtype})")


def megatron_to_hf(args: argparse.Namespace) -> None:
    """torch_dist checkpoint -> HF folder (sharded safetensors + index, config, tokenizer)."""
    import json

    import torch
    from tqdm import tqdm

    from hpt_megatron.models.checkpoint import META_FILE
    from hpt_megatron.models.export import bucketed
    from hpt_megatron.models.hf_io import HFCheckpointWriter, copy_side_files, write_config
    from hpt_megatron.models.provider import check_hf_supported, load_hf_config
    from hpt_megatron.models.torch_dist_reader import (
        TorchDistCheckpoint,
        iter_checkpoint_hf_tensors,
    )

    _check_one_process()
    _freeze_imports()
    hf = load_hf_config(args.hf_config or args.load)
    check_hf_supported(hf)
    ckpt = TorchDistCheckpoint(args.load)
    meta_path = Path(args.load) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    dtype = args.dtype or meta.get("params_dtype") or _hf_dtype(hf)
    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
    # Plan the shards from shapes alone (the same mapping run on meta tensors), then stream every
    # tensor straight into its shard: one tensor in memory at a time, whatever --shard-mib is.
    planned = iter_checkpoint_hf_tensors(ckpt, hf, dtype=torch_dtype, meta=True)
    shards = list(bucketed(planned, args.shard_mib * 1024**2))
    tensors = iter_checkpoint_hf_tensors(ckpt, hf, dtype=torch_dtype)
    bar = iter(tqdm(tensors, desc="megatron-to-hf", unit="tensor", disable=args.no_progress))
    writer = HFCheckpointWriter(args.out)
    for i, shard in enumerate(shards):
        entries = [(n, t.dtype, tuple(t.shape)) for n, t in shard]
        writer.write_stream(entries, bar, f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    writer.finish()
    write_config(hf, args.out, torch_dtype=_TORCH_DTYPES[dtype])
    copy_side_files(args.load, args.out)
    print(f"wrote HF folder {args.out} ({dtype})")


def critic_to_hf(args: argparse.Namespace) -> None:
    """A critic checkpoint -> HF token-classification folder (see the module docstring)."""
    from hpt_megatron.config.sections import ModelConfig, ParallelConfig
    from hpt_megatron.models.hf_io import copy_side_files
    from hpt_megatron.models.provider import check_hf_supported, load_hf_config
    from hpt_megatron.models.value import build_value_chunks, save_value_hf_folder
    from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
    from hpt_megatron.trainer.checkpoint_files import load_checkpoint

    _check_one_process()
    load = Path(args.load)
    policy = load.parent.parent / load.name  # <run>/checkpoints/step_N beside critic/step_N
    source = Path(args.hf_config) if args.hf_config else policy
    if not (source / "config.json").is_file():
        raise ValueError(f"--hf-config: no config.json in {source} (name the policy's folder)")
    hf = load_hf_config(source)
    check_hf_supported(hf)
    parallel = ParallelConfig(backend="gloo")
    ctx = init_distributed(parallel, seed=0)
    try:
        chunks = build_value_chunks(hf, ModelConfig(), parallel, pp_rank=0, init_weights=False)
        load_checkpoint(load, chunks)
        save_value_hf_folder(chunks, hf, args.out, ctx, torch_dtype="float32")  # built in fp32
    finally:
        shutdown_distributed()
    copy_side_files(source, args.out)
    print(f"wrote HF value model {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/convert.py`` and ``hpt convert``; returns the exit status."""
    args = _parse(argv)
    try:
        for flag in ("hf", "load", "hf_config"):
            path = getattr(args, flag, None)
            if path is not None and not Path(path).exists():
                raise ValueError(f"--{flag.replace('_', '-')}: {path} does not exist")
        if args.command == "hf-to-megatron":
            hf_to_megatron(args)
        elif args.command == "critic-to-hf":
            critic_to_hf(args)
        else:
            megatron_to_hf(args)
    except ValueError as err:  # ConfigError included: a user error, named by its message
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        gc.unfreeze()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
