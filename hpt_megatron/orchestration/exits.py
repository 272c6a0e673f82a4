"""How ``hpt train`` ends on an error it recognises: one message, no traceback, an exit code.

- exit 2, a mistake in what the user gave (as the dry run): ``ValueError`` (with
  ``ConfigError``: the config, the data, the model, the parallel layout, the run directory of
  another run) and ``ServerStartError`` (an SGLang server that does not start or answer);
- exit 1, a run stopped by its environment or its numbers: ``WriteError`` (a full or read-only
  disk, ``hpt_megatron/disk.py``), ``CheckpointError``, ``NonFiniteError``; and a rank whose
  collective failed because another rank exited (gloo's "Connection closed by peer"): that
  rank's message is the cause, this one says so in one line.

The message is the last line the process prints (``hpt train: ...``). Under torchrun each
failing rank also writes it to its error file (``$TORCHELASTIC_ERROR_FILE``, the format of
``torch.distributed.elastic``'s ``record``), so torchrun's failure summary shows it in place of
"To enable traceback see ..."; there only rank 0 prints it, so that a mistake every rank makes
is printed once. Any other exception keeps its traceback, recorded by ``record`` (``cli.py``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_RUN_STOPPED = 1
SECONDARY_DELAY_S = 5


def exit_code(err: BaseException) -> int | None:
    """The exit code of an error ``hpt train`` recognises; None for any other."""
    if isinstance(err, ValueError) and _raised_here(err):
        return EXIT_USER_ERROR
    from hpt_megatron.disk import WriteError
    from hpt_megatron.orchestration.faults import NonFiniteError
    from hpt_megatron.rollout.sglang.server import ServerStartError
    from hpt_megatron.trainer.checkpoint_files import CheckpointError

    if isinstance(err, ServerStartError):
        return EXIT_USER_ERROR
    if isinstance(err, (WriteError, CheckpointError, NonFiniteError)) or _peer_lost(err):
        return EXIT_RUN_STOPPED
    return None


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by this package's own code (a check that names what the user
    got wrong), not inside a library, whose ``ValueError`` keeps its traceback."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or tb.tb_frame.f_code.co_filename.startswith(_PACKAGE)


_PACKAGE = str(Path(__file__).resolve().parents[1])

PEER_LOST = ("Connection closed by peer", "Connection reset by peer")  # gloo's words


def is_secondary(err: BaseException) -> bool:
    """Whether ``err`` only follows another rank's failure."""
    return _peer_lost(err)


# What a collective raises (not a RuntimeError of ours, such as ServerStartError).
COLLECTIVE_ERRORS = ("RuntimeError", "DistError", "DistBackendError", "DistNetworkError")


def _peer_lost(err: BaseException) -> bool:
    if type(err).__name__ not in COLLECTIVE_ERRORS:
        return False
    return any(words in str(err) for words in PEER_LOST)


def report(message: str, code: int, *, secondary: bool = False) -> int:
    """Print ``message`` (on rank 0 under torchrun), write it to this rank's torchrun error
    file; return ``code``. A ``secondary`` failure (a lost peer) is dated a few seconds later,
    so that torchrun's summary takes the failing rank's error as its root cause (the first
    failure by time, to the second)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        when = int(time.time()) + (SECONDARY_DELAY_S if secondary else 0)
        record = {
            "message": {
                "message": message,
                "extraInfo": {"py_callstack": message, "timestamp": str(when)},
            }
        }
        try:
            with open(error_file, "w") as f:
                json.dump(record, f)
        except OSError:
            error_file = None  # the message must still be seen
    if not error_file or os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    return code


def describe(err: BaseException) -> str:
    """``err`` as ``hpt train``'s message: a user error by its text, a stop of the run with its
    kind (``CheckpointError: ...``)."""
    if _peer_lost(err):
        rank = os.environ.get("RANK", "0")
        return f"rank {rank} lost another rank in a collective (that rank's error is the cause)"
    if exit_code(err) == EXIT_USER_ERROR:
        return str(err)
    return f"{type(err).__name__}: {err}"
