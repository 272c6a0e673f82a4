"""Which package files one colocated CPU-engine step of ``hpt train`` runs.

Runs the tiny config for three steps in this process (one rank, the CPU engine, a save at step
2) and lists every file of ``hpt_megatron/`` with a function called inside ``StepLoop.step`` of
step 2 (a profile hook on every thread of this process; the grading workers are other
processes). Usage: ``python benchmarks/step_files.py OUT_DIR``.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from hpt_megatron.orchestration import loop

PACKAGE = str(Path(loop.__file__).resolve().parents[1])


def trace_step(target: int = 2) -> set[str]:
    """Patch ``StepLoop.step`` so that call number ``target`` records the files it runs."""
    seen: set[str] = set()
    calls = {"n": 0}
    original = loop.StepLoop.step

    def hook(frame: Any, event: str, arg: Any) -> None:
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE):
            seen.add(name[len(PACKAGE) + 1 :])

    def step(self: loop.StepLoop, step: int) -> Any:
        calls["n"] += 1
        if calls["n"] != target:
            return original(self, step)
        threading.setprofile(hook)
        sys.setprofile(hook)
        try:
            return original(self, step)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)

    loop.StepLoop.step = step  # type: ignore[method-assign]
    return seen


def main() -> int:
    from hpt_megatron.cli import main as hpt

    seen = trace_step()
    overrides = ["run.steps=3", "parallel.tp=1", "run.val_every=0", "data.prompts_per_step=4"]
    overrides += ["rollout.n=4", "checkpoint.save_every=2", "logging.progress_bar=false"]
    code = hpt(["train", "examples/tiny_cpu.yaml", f"run.output_dir={sys.argv[1]}", *overrides])
    print(f"{len(seen)} package files ran in step 2 (exit {code}):")
    for name in sorted(seen):
        print(f"  {name}")
    return code


if __name__ == "__main__":
    sys.exit(main())
