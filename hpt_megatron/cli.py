"""The ``hpt`` command: ``hpt train CONFIG [key.sub=value ...] [--dry-run]``, ``hpt eval``,
``hpt convert``.

Under torchrun every process runs the same command; a plain ``hpt train`` is a world of one.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

USAGE = """usage: hpt {train,eval,convert} ...

  hpt train CONFIG.yaml [key.sub=value ...]   train (torchrun -m hpt_megatron.cli train ... for
                                              several processes)
            [--dry-run [--world-size N]]      check the config on this machine, print it, exit
  hpt eval --model HF_DIR --benchmarks ...     evaluate on the paper's benchmarks
  hpt convert {hf-to-megatron,megatron-to-hf,critic-to-hf}  convert checkpoints (tools/convert.py)
"""


TRAIN_USAGE = """usage: hpt train CONFIG.yaml [key.sub=value ...] [--dry-run] [--world-size N]

  --dry-run       check everything that can be checked without training (config, parallel layout
                  against the model, data files, reward functions, devices, SGLang), print the
                  resolved config and exit
  --world-size N  the world size to check against (default: $WORLD_SIZE, else 1)
"""


@dataclass
class TrainArgs:
    config: str
    overrides: list[str]
    dry_run: bool
    world_size: int | None


def parse_train_args(argv: list[str]) -> TrainArgs:
    """``CONFIG`` first, then overrides and the flags in any order."""
    config, rest = argv[0], argv[1:]
    overrides, dry_run, world_size = [], False, None
    while rest:
        arg = rest.pop(0)
        if arg == "--dry-run":
            dry_run = True
        elif arg == "--world-size" or arg.startswith("--world-size="):
            value = arg.partition("=")[2] or (rest.pop(0) if rest else "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--world-size: expected a positive integer, got {value!r}")
            world_size = int(value)
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r}")
        else:
            overrides.append(arg)
    if world_size is not None and not dry_run:
        raise ValueError("--world-size goes with --dry-run (torchrun sets a run's world size)")
    return TrainArgs(config, overrides, dry_run, world_size)


def _world_size(args: TrainArgs) -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return args.world_size or 1


def _train(argv: list[str]) -> int:
    from hpt_megatron.config import ConfigError, load_config

    if not argv or argv[0] in ("-h", "--help"):
        print(TRAIN_USAGE)
        return 0 if argv else 2
    try:
        args = parse_train_args(argv)
    except ValueError as err:
        print(f"hpt train: {err}\n{TRAIN_USAGE}", file=sys.stderr)
        return 2
    from hpt_megatron.orchestration.exits import describe, exit_code, is_secondary, report

    try:
        cfg = load_config(args.config, args.overrides)
        from hpt_megatron.orchestration.preflight import preflight

        preflight(cfg, _world_size(args))
    except ConfigError as err:
        return report(f"hpt train: config error: {err}", 2)
    if args.dry_run:
        if os.environ.get("RANK", "0") == "0":
            import yaml

            from hpt_megatron.config import to_dict

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from hpt_megatron.orchestration.loop import train

    try:
        train(cfg)
    except Exception as err:  # a recognised error is one message (orchestration/exits.py)
        code = exit_code(err)
        if code is None:
            raise
        return report(f"hpt train: {describe(err)}", code, secondary=is_secondary(err))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines drown the progress bar
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
