"""``hpt eval``: evaluate a model on benchmarks with the paper's protocol."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.data.templates import QWEN_MATH_SYSTEM_PROMPT, PromptTemplate
from hpt_megatron.eval.benchmarks import (
    BENCHMARKS,
    MATH_BENCHMARKS,
    load_benchmarks,
    split_names,
)
from hpt_megatron.eval.runner import EvalOptions, evaluate_loaded, format_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpt eval", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face model folder (weights + tokenizer)")
    src.add_argument(
        "--megatron-checkpoint",
        help="Megatron distributed checkpoint (a run's checkpoints/step_N or the converter's "
        "output); converted to a temporary HF folder first",
    )
    parser.add_argument(
        "--hf-config",
        help="folder with config.json and tokenizer for --megatron-checkpoint "
        "(default: the checkpoint folder itself)",
    )
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=list(MATH_BENCHMARKS),
        help=f"names ({', '.join(BENCHMARKS)}) or dataset files, space- or comma-separated "
        "(default: the six math benchmarks)",
    )
    parser.add_argument(
        "--data-root",
        help="the benchmark data folder, holding eval/unify/*.json and eval/luffy/*.parquet "
        "(default: $HPT_DATA_ROOT, else data/ in the working directory)",
    )
    parser.add_argument("--output-dir", default="eval_out", help="responses.jsonl and summary.json")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=8192)
    parser.add_argument("--k", type=int, help="samples per problem for every benchmark")
    parser.add_argument("--pass-k", default="1,8,32", help="comma-separated pass@k to report")
    parser.add_argument("--template", choices=["chat", "llama_zero", "raw"], default="chat")
    parser.add_argument("--system-prompt", default="qwen_math", help="'qwen_math', text, or 'none'")
    parser.add_argument("--keep-dataset-system", action="store_true")
    parser.add_argument("--limit", type=int, help="first N problems per benchmark (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grade-workers", type=int, default=2)
    parser.add_argument(
        "--grade-timeout",
        type=float,
        default=5.0,
        help="CPU seconds one answer may take to grade (4x that of wall time); past it, 0",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    sgl = parser.add_argument_group("SGLang (--engine sglang)")
    parser.add_argument(
        "--engine",
        choices=["cpu", "sglang"],
        default="cpu",
        help="cpu: the in-process engine; sglang: SGLang servers (launched, or --urls)",
    )
    sgl.add_argument(
        "--urls",
        nargs="+",
        help="servers (or one sglang-router) already serving the model; --model then only "
        "gives the tokenizer. Without it, servers are launched on --model",
    )
    sgl.add_argument(
        "--num-servers",
        type=int,
        help="servers to launch (default: every GPU of the node / --tp-size; 1 on CPU)",
    )
    sgl.add_argument("--tp-size", type=int, default=1, help="GPUs per launched server")
    sgl.add_argument(
        "--sglang-device", choices=["cuda", "cpu"], help="default: cuda when a GPU is visible"
    )
    sgl.add_argument("--api-key-env", help="environment variable holding the servers' API key")
    sgl.add_argument(
        "--max-total-tokens",
        type=int,
        help="KV-cache tokens per launched server (bounds RAM on CPU)",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    system = {"qwen_math": QWEN_MATH_SYSTEM_PROMPT, "none": None}.get(
        args.system_prompt, args.system_prompt
    )
    template = PromptTemplate(
        kind=args.template, system_prompt=system, drop_dataset_system=not args.keep_dataset_system
    )
    try:
        pass_ks = [int(k) for k in args.pass_k.split(",") if k]
    except ValueError:
        raise ValueError(
            f"--pass-k: expected comma-separated integers, got '{args.pass_k}'"
        ) from None
    return EvalOptions(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        k=args.k,
        pass_ks=pass_ks,
        template=template,
        seed=args.seed,
        limit=args.limit,
        num_workers=args.grade_workers,
        grade_timeout_s=args.grade_timeout,
        progress=not args.no_progress,
    )


def load_engine(model_dir: str) -> tuple[Any, Any]:
    """The CPU rollout engine and tokenizer for an HF folder (for SGLang, call run_eval)."""
    if not Path(model_dir).is_dir():
        raise ValueError(f"--model: '{model_dir}' is not a folder")
    from transformers import AutoTokenizer

    from hpt_megatron.rollout.cpu_engine import HFCpuEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return HFCpuEngine.from_pretrained(model_dir, load_tokenizer=False), tokenizer


def sglang_config(args: argparse.Namespace) -> SGLangConfig:
    """The ``rollout.sglang`` settings of ``hpt eval --engine sglang`` (checked)."""
    if args.engine != "sglang":
        given = [
            k for k in ("urls", "num_servers", "sglang_device", "api_key_env") if getattr(args, k)
        ]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --engine sglang")
        return SGLangConfig()
    import torch

    device: Literal["cuda", "cpu"] = args.sglang_device or (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    num_servers = 1
    if args.urls:
        if args.num_servers:
            raise ValueError("--num-servers: servers are launched only without --urls")
    elif args.num_servers:
        num_servers = args.num_servers
    elif device == "cuda":  # data-parallel over every GPU of the node
        num_servers = max(1, torch.cuda.device_count() // args.tp_size)
    cfg = SGLangConfig(
        device=device,
        servers_per_node=num_servers,
        tp_size=args.tp_size,
        urls=list(args.urls or []),
        api_key_env=args.api_key_env,
        max_total_tokens=args.max_total_tokens,
        request_timeout_s=3600.0,
    )
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"--engine sglang: {err}") from None
    return cfg


def load_sglang_engine(model_dir: str, cfg: SGLangConfig, output_dir: str) -> tuple[Any, Any]:
    """SGLang servers on ``model_dir`` (or the ``cfg.urls`` ones) and the folder's tokenizer;
    server logs go to ``<output_dir>/sglang_logs``."""
    if not Path(model_dir).is_dir():
        raise ValueError(f"--model: '{model_dir}' is not a folder")
    python = cfg.python_executable()
    if not cfg.urls and not Path(python).exists():
        raise ValueError(
            f"--engine sglang: SGLang's python {python} is not there (tools/sglang_env.sh "
            "builds it; or set HPT_SGLANG_VENV)"
        )
    from transformers import AutoTokenizer

    from hpt_megatron.rollout.sglang import ServerStartError, SGLangEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        engine = SGLangEngine.launch(cfg, model_path=model_dir, run_dir=output_dir)
    except ServerStartError as err:
        raise ValueError(str(err)) from None
    return engine, tokenizer


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hpt eval``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.benchmarks = split_names(args.benchmarks)  # names before any conversion
        with tempfile.TemporaryDirectory(prefix="hpt-eval-") as tmp:
            if args.megatron_checkpoint:
                args.model = _convert(args.megatron_checkpoint, args.hf_config, tmp)
            return _evaluate(args)
    except ValueError as err:
        print(f"hpt eval: error: {err}", file=sys.stderr)
        return 2


def _convert(checkpoint: str, hf_config: str | None, tmp: str) -> str:
    """A Megatron checkpoint as an HF folder in ``tmp`` (through the converter)."""
    from hpt_megatron.convert import main as convert_main

    out = str(Path(tmp) / "hf")
    argv = ["megatron-to-hf", "--load", checkpoint, "--out", out, "--no-progress"]
    if hf_config:
        argv += ["--hf-config", hf_config]
    if convert_main(argv) != 0:
        raise ValueError(f"--megatron-checkpoint: could not convert {checkpoint} (see above)")
    if hf_config:
        from hpt_megatron.models.hf_io import copy_side_files

        copy_side_files(hf_config, out)
    return out


def _evaluate(args: argparse.Namespace) -> int:
    """Settings, then the model folder and the benchmark files, then the engine (the model
    loads last: a mistake in the others is reported at once)."""
    options = options_from_args(args)
    sglang = sglang_config(args)
    if not Path(args.model).is_dir():
        raise ValueError(f"--model: '{args.model}' is not a folder")
    loaded = load_benchmarks(args.benchmarks, args.data_root)
    if args.engine == "sglang":
        engine, tokenizer = load_sglang_engine(args.model, sglang, args.output_dir)
    else:
        engine, tokenizer = load_engine(args.model)
    settings = {
        "model": args.megatron_checkpoint or args.model,
        "engine": args.engine,
        "benchmarks": args.benchmarks,
    }
    try:
        results = evaluate_loaded(
            engine,
            tokenizer,
            loaded,
            options=options,
            output_dir=args.output_dir,
            settings=settings,
        )
    finally:
        engine.shutdown()
    print(format_table(results))
    out = Path(args.output_dir)
    print(f"responses and scores: {out / 'responses.jsonl'}; summary: {out / 'summary.json'}")
    return 0
