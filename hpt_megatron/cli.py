"""The ``hpt`` command: ``hpt train CONFIG [key.sub=value ...] [--dry-run]``, ``hpt eval``,
``hpt convert``.

Under torchrun every process runs the same command; a plain ``hpt train`` is a world of one.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpt_megatron.orchestration.preflight import Target

# How long a rank that only lost another rank waits before it exits (cli._train).
SECONDARY_EXIT_WAIT_S = 20.0

USAGE = """usage: hpt {train,eval,convert} ...

  hpt train CONFIG.yaml [key.sub=value ...]   train (torchrun -m hpt_megatron.cli train ... for
                                              several processes)
            [--dry-run [--world-size N] [--target gpu]]  check the config (for this machine, or
                                              a GPU node), print it and a summary, exit
  hpt eval --model HF_DIR --benchmarks ...     evaluate on the paper's benchmarks
  hpt convert {hf-to-megatron,megatron-to-hf,critic-to-hf}  convert checkpoints (tools/convert.py)
"""


TRAIN_USAGE = """usage: hpt train CONFIG.yaml [key.sub=value ...] [--dry-run] [--world-size N]
                 [--target {here,gpu}] [--gpus-per-node N] [--gpu NAME|GIB]

  --dry-run          check everything that can be checked without training (config, parallel
                     layout against the model, SGLang's context length and tensor parallelism,
                     data files, writable directories and free disk, reward functions, devices,
                     SGLang), report every problem at once; else print the resolved config
                     (stdout), a summary with a memory estimate per GPU and `dry run: OK` (stderr)
  --world-size N     the world size to check against (default: $WORLD_SIZE, else 1)
  --target gpu       check for a GPU node from a machine without GPUs (a login node): GPU-only
                     settings are allowed, the GPU node's devices and installs are not checked
  --gpus-per-node N  GPUs of a node, for SGLang's servers x tp_size (default: the visible ones)
  --gpu NAME|GIB     the GPU, for the memory estimate: h100, a100-40gb, h200, ... or its GiB
                     (default: the visible one's)
"""


@dataclass
class TrainArgs:
    config: str
    overrides: list[str]
    dry_run: bool
    world_size: int | None
    target: str = "here"
    gpus_per_node: int | None = None
    gpu: str | None = None


def _positive(flag: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value!r}")
    return int(value)


def parse_train_args(argv: list[str]) -> TrainArgs:
    """``CONFIG`` first, then overrides and the flags in any order (``--flag V`` or
    ``--flag=V``)."""
    args = TrainArgs(argv[0], [], False, None)
    rest = argv[1:]
    valued = ("--world-size", "--target", "--gpus-per-node", "--gpu")
    while rest:
        arg = rest.pop(0)
        flag = arg.partition("=")[0]
        if arg == "--dry-run":
            args.dry_run = True
        elif flag in valued:
            value = arg.partition("=")[2] or (rest.pop(0) if rest else "")
            if flag == "--world-size":
                args.world_size = _positive(flag, value)
            elif flag == "--gpus-per-node":
                args.gpus_per_node = _positive(flag, value)
            elif flag == "--target":
                if value not in ("here", "gpu"):
                    raise ValueError(f"--target: expected here or gpu, got {value!r}")
                args.target = value
            else:
                args.gpu = value
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r}")
        else:
            args.overrides.append(arg)
    given = [f for f in valued if any(a.partition("=")[0] == f for a in argv[1:])]
    if given and not args.dry_run:
        raise ValueError(
            f"{given[0]} goes with --dry-run (torchrun sets a run's world size, and the run "
            "checks the machine it runs on)"
        )
    return args


def _world_size(args: TrainArgs) -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return args.world_size or 1


def _target(args: TrainArgs) -> Target:
    """The machine a run is checked for (preflight imports torch: imported here, late)."""
    from hpt_megatron.orchestration.estimate import gpu_memory_gib
    from hpt_megatron.orchestration.preflight import Target

    memory = None
    if args.gpu is not None:
        memory = gpu_memory_gib(args.gpu)
        if memory is None:
            raise ValueError(f"--gpu: unknown GPU {args.gpu!r}; give its memory in GiB (--gpu 80)")
    if args.target == "gpu":
        return Target.gpu_node(args.gpus_per_node, memory)
    return Target.this_machine(args.gpus_per_node, memory)


def _train(argv: list[str]) -> int:
    from hpt_megatron.config import ConfigError, load_config

    if not argv or argv[0] in ("-h", "--help"):
        print(TRAIN_USAGE)
        return 0 if argv else 2
    try:
        args = parse_train_args(argv)
        target = _target(args)
    except ValueError as err:
        print(f"hpt train: {err}\n{TRAIN_USAGE}", file=sys.stderr)
        return 2
    from hpt_megatron.orchestration.exits import describe, exit_code, is_secondary, report

    try:
        cfg = load_config(args.config, args.overrides)
        from hpt_megatron.orchestration.preflight import preflight

        findings = preflight(cfg, _world_size(args), target)
    except ConfigError as err:
        message = "\n".join(f"hpt train: config error: {p}" for p in err.problems)
        return report(message, 2)
    if args.dry_run:
        if os.environ.get("RANK", "0") == "0":
            import yaml

            from hpt_megatron.config import to_dict
            from hpt_megatron.orchestration.dry_run import summary_lines

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="", flush=True)
            for line in summary_lines(cfg, _world_size(args), findings, target):
                print(line, file=sys.stderr)
        return 0
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger("hpt_megatron").info(
            "config %s%s: run directory %s (world size %d)",
            args.config,
            f" with {len(args.overrides)} override(s)" if args.overrides else "",
            os.path.abspath(cfg.run.run_dir),
            _world_size(args),
        )
    from hpt_megatron.orchestration.loop import train

    try:
        train(cfg)
    except Exception as err:  # a recognised error is one message (orchestration/exits.py)
        code = exit_code(err)
        if code is None:
            raise
        secondary = is_secondary(err)
        code = report(f"hpt train: {describe(err)}", code, secondary=secondary)
        if secondary:
            # The rank that failed first can still be closing its run (reward workers, servers)
            # after its collective broke: torchrun ends the other ranks at the first exit it
            # sees, so this one lets that rank exit first, with its own code.
            time.sleep(SECONDARY_EXIT_WAIT_S)
        return code
    return 0


def tidy_warnings(rank: str) -> None:
    """Python warnings as one line each, each first sentence once, and those of other packages
    on rank 0 only: Megatron says "Transformer Engine and Apex are not installed" from six
    modules, on every rank, with a source line each. The project's own warnings show on every
    rank (once per sentence)."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        text = str(message)
        ours = f"{os.sep}hpt_megatron{os.sep}" in filename
        key = text.split(". ")[0]
        if key in seen or (rank != "0" and not ours):
            return
        seen.add(key)
        where = Path(filename).parent.name + "/" + Path(filename).name
        print(f"WARNING {category.__name__} ({where}): {text}", file=file or sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines drown the progress bar
    tidy_warnings(os.environ.get("RANK", "0"))
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        # An unexpected exception is written to torchrun's error file with its traceback.
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_train)(rest) or 0
    if command == "eval":
        from hpt_megatron.eval.cli import main as eval_main

        return eval_main(rest)
    if command == "convert":
        from hpt_megatron.convert import main as convert_main

        return convert_main(rest)
    print(f"hpt: unknown command '{command}'\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
