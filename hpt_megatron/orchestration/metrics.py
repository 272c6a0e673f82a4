"""Step metrics to TensorBoard event files, a JSONL file, and a console progress bar.

A file that cannot be written (a full disk) is a :class:`~hpt_megatron.disk.WriteError` naming
it. A resumed run starts both files at its checkpoint's step: TensorBoard purges the later events
(``purge_step``), and ``metrics.jsonl`` is cut to the rows of the steps up to the resumed one
(:func:`truncate_jsonl`), so that every step appears once.

With ``logging.wandb_project`` the steps go to Weights & Biases too (the ``wandb`` extra;
``WANDB_MODE`` picks online, offline or disabled, as wandb itself reads it). The run's wandb id is
kept in ``<run_dir>/wandb_run_id`` (:func:`wandb_run_id`): a resumed run continues the same wandb
run. wandb refuses a step at or below the last one it holds, so it cannot replace the steps a
resume logs again (those after the checkpoint): it keeps their first values. Online, the resumed
run knows its last step and the replayed steps are not sent (one line says so); offline, each
start writes its own ``wandb/offline-run-*-<id>`` folder with all its steps, and ``wandb sync``
uploads the folders in start order into the one run, where the same rule applies.
"""

from __future__ import annotations

import json
import math
import secrets
import string
import threading
from pathlib import Path
from typing import Any

from hpt_megatron.disk import WriteError, replace_text, writing

TB, JSONL, WANDB_ID = "TensorBoard events", "metrics", "wandb run id"
WANDB_ID_FILE = "wandb_run_id"
HEADLINE = ("reward/mean", "gate/sft_fraction", "val/accuracy", "loss", "time/step_s")


class MetricsLogger:
    """Driver-only writer; other ranks construct it with ``enabled=False``."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        tensorboard: bool = True,
        jsonl: bool = True,
        wandb_project: str | None = None,
        total_steps: int = 0,
        progress_bar: bool = True,
        start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self._tb = self._jsonl = self._bar = self._wandb = None
        self._wandb_from = 0  # the first step wandb accepts (a resumed online run's next step)
        self._tb_dir = Path(run_dir) / "tensorboard"
        self._jsonl_path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with writing(self._tb_dir, TB):
                self._tb = SummaryWriter(str(self._tb_dir), purge_step=start_step + 1)
                _quiet_tensorboard_thread()
        if jsonl:
            with writing(self._jsonl_path, JSONL):
                truncate_jsonl(self._jsonl_path, start_step)
                self._jsonl = open(self._jsonl_path, "a")  # noqa: SIM115
        if wandb_project:
            self._wandb, self._wandb_from = _start_wandb(wandb_project, Path(run_dir), start_step)
        if progress_bar:
            from tqdm import tqdm

            # tqdm's monitor thread breaks the processes that dist-checkpointing forks to write.
            tqdm.monitor_interval = 0
            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="hpt train", dynamic_ncols=True
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        if self._tb is not None:
            with writing(self._tb_dir, TB):
                for key, value in scalars.items():
                    self._tb.add_scalar(key, value, step)
                self._tb.flush()
        if self._jsonl is not None:
            with writing(self._jsonl_path, JSONL):
                self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
                self._jsonl.flush()
        if self._wandb is not None and step >= self._wandb_from:
            self._wandb.log(scalars, step=step)
        if self._bar is not None:
            shown = {k.split("/")[-1]: f"{scalars[k]:.3g}" for k in HEADLINE if k in scalars}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def histogram(self, step: int, key: str, values: list[float]) -> None:
        if self.enabled and self._tb is not None and values:
            import numpy as np

            self._tb.add_histogram(key, np.asarray(values), step)

    def close(self, *, quiet: bool = False) -> None:
        """Flush and close the files; ``quiet`` (the run already failed) drops a write error
        instead of raising it over the run's own."""
        if self._bar is not None:
            self._bar.close()
        for handle, path, what in (
            (self._tb, self._tb_dir, TB),
            (self._jsonl, self._jsonl_path, JSONL),
        ):
            if handle is None:
                continue
            try:
                with writing(path, what):
                    handle.close()
            except WriteError:
                if not quiet:
                    raise
        if self._wandb is not None:
            self._wandb.finish()


def wandb_run_id(run_dir: Path, start_step: int) -> str:
    """The wandb run id of the run in ``run_dir``: a resumed run (``start_step`` > 0) reads the
    one kept in ``<run_dir>/wandb_run_id``; a run from step 0 (or one that had no id yet) draws
    a new one (eight lowercase letters and digits, wandb's own form) and keeps it there."""
    path = run_dir / WANDB_ID_FILE
    if start_step > 0 and path.is_file():
        kept = path.read_text().strip()
        if kept:
            return kept
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    replace_text(path, run_id + "\n", WANDB_ID)
    return run_id


def _start_wandb(project: str, run_dir: Path, start_step: int) -> tuple[Any, int]:
    """``wandb.init`` on the run's id (``resume="allow"``: the same run on a resume); the run
    and the first step it accepts (online, a resumed run holds the steps up to its last one)."""
    import wandb

    run = wandb.init(
        project=project, dir=str(run_dir), id=wandb_run_id(run_dir, start_step), resume="allow"
    )
    first = int(getattr(run, "starting_step", 0) or 0)
    if first > start_step + 1:
        print(
            f"hpt: wandb run {run.id} already holds steps up to {first - 1}; steps "
            f"{start_step + 1}-{first - 1} logged again after the resume keep their first values "
            "there (metrics.jsonl and TensorBoard have the new ones)",
            flush=True,
        )
    return run, first


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows of ``path`` whose step is at most ``last_step`` (the steps a resumed run
    logs again are dropped, as is a line cut short by a crash); replaced atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            kept.append(line + "\n")
    replace_text(path, "".join(kept), JSONL)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


WORK_TIMES = (
    "time/generation_s",
    "time/grading_s",
    "time/logprob_s",
    "time/train_s",
    "time/ref_s",
    "time/critic_s",
    "time/weight_sync_s",
    "time/validation_s",
)


def derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Throughput and the scheduler's own overhead (step time outside the named work)."""
    step_s = metrics["time/step_s"]
    work = sum(metrics.get(k, 0.0) for k in WORK_TIMES)
    return {
        "throughput/tokens_per_s": metrics.get("train/tokens", 0.0) / step_s if step_s else 0.0,
        "time/overhead_share": max(0.0, step_s - work) / step_s if step_s else 0.0,
    }


def _quiet_tensorboard_thread() -> None:
    """TensorBoard's writer thread hands its write error (a full disk) to the thread that logs
    next (``_check_worker_status``), which reports it as one ``WriteError``: the traceback the
    writer thread would print on its way out is that same error again, and is left out."""
    previous = threading.excepthook
    if getattr(previous, "hpt_quiet_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        thread = type(args.thread).__name__ if args.thread is not None else ""
        if thread == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.hpt_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook
