"""Step metrics to TensorBoard event files, a JSONL file, and a console progress bar.

A file that cannot be written (a full disk) is a :class:`~hpt_megatron.disk.WriteError` naming
it. A resumed run starts both files at its checkpoint's step: TensorBoard purges the later events
(``purge_step``), and ``metrics.jsonl`` is cut to the rows of the steps up to the resumed one
(:func:`truncate_jsonl`), so that every step appears once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from hpt_megatron.disk import WriteError, remove, writing

TB, JSONL = "TensorBoard events", "metrics"
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
        self._tb_dir = Path(run_dir) / "tensorboard"
        self._jsonl_path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with writing(self._tb_dir, TB):
                self._tb = SummaryWriter(str(self._tb_dir), purge_step=start_step + 1)
        if jsonl:
            with writing(self._jsonl_path, JSONL):
                truncate_jsonl(self._jsonl_path, start_step)
                self._jsonl = open(self._jsonl_path, "a")  # noqa: SIM115
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), resume="allow")
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
        if self._wandb is not None:
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
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    except OSError:
        remove(tmp)
        raise


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
