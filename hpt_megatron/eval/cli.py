"""``hpt eval``: evaluate a model on benchmarks with the paper's protocol."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from hpt_megatron.data.templates import QWEN_MATH_SYSTEM_PROMPT, PromptTemplate
from hpt_megatron.eval.benchmarks import BENCHMARKS, MATH_BENCHMARKS
from hpt_megatron.eval.runner import EvalOptions, format_table, run_eval


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
        default=",".join(MATH_BENCHMARKS),
        help=f"comma-separated names ({', '.join(BENCHMARKS)}) or dataset files",
    )
    parser.add_argument(
        "--data-root", help="shared data folder (default: $HPT_DATA_ROOT, ../shared/data)"
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
    parser.add_argument("--grade-timeout", type=float, default=5.0)
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
    )


def load_engine(model_dir: str) -> tuple[Any, Any]:
    """The CPU rollout engine and tokenizer for an HF folder (for SGLang, call run_eval)."""
    if not Path(model_dir).is_dir():
        raise ValueError(f"--model: '{model_dir}' is not a folder")
    from transformers import AutoTokenizer

    from hpt_megatron.rollout.cpu_engine import HFCpuEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return HFCpuEngine.from_pretrained(model_dir, load_tokenizer=False), tokenizer


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hpt eval``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
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
    options = options_from_args(args)
    engine, tokenizer = load_engine(args.model)
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    try:
        results = run_eval(
            engine,
            tokenizer,
            benchmarks,
            options=options,
            data_root=args.data_root,
            output_dir=args.output_dir,
        )
    finally:
        engine.shutdown()
    print(format_table(results))
    print(f"responses and scores: {Path(args.output_dir) / 'responses.jsonl'}")
    return 0
