"""The ``hpt`` command: ``hpt train CONFIG [key.sub=value ...]``, ``hpt eval``, ``hpt convert``.

Under torchrun every process runs the same command; a plain ``hpt train`` is a world of one.
"""

from __future__ import annotations

import logging
import sys

USAGE = """usage: hpt {train,eval,convert} ...

  hpt train CONFIG.yaml [key.sub=value ...]   train (torchrun -m hpt_megatron.cli train ... for
                                              several processes)
  hpt eval --model HF_DIR --benchmarks ...     evaluate on the paper's benchmarks
  hpt convert {hf-to-megatron,megatron-to-hf}  convert checkpoints (see tools/convert.py)
"""


def _train(argv: list[str]) -> int:
    from hpt_megatron.config import ConfigError, load_config

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hpt train CONFIG.yaml [key.sub=value ...]")
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as err:
        print(f"hpt train: config error: {err}", file=sys.stderr)
        return 2
    from hpt_megatron.orchestration.loop import train

    try:
        train(cfg)
    except ValueError as err:  # user errors found while building the run (data, model, ...)
        print(f"hpt train: {err}", file=sys.stderr)
        return 2
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
        return _train(rest)
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
