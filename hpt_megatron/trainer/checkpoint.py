"""The run's one checkpointer: when to save, what to keep, where a run resumes from, for every
part of a run's state.

Parts, all written and read here (the directory names and formats are those of earlier versions):

- policy: ``<root>/step_N`` (model, optimizer; ``trainer/checkpoint_files.py`` has the layout),
  and ``<root>/best`` (weights only) on a new best validation score;
- critic (advantage ``gae``): ``<root>/critic/step_N`` (model, optimizer, schedule), saved just
  before the policy's ``step_N`` (so a complete policy checkpoint always has its critic) and
  pruned to the policy's;
- reference (a KL term on the run's initial random weights): ``<run_dir>/reference``, saved once
  by a fresh run and loaded by a resumed one;
- data and sampler state, RNG, LR schedule, step and best score: ``hpt_state.json`` of
  ``step_N``, all taken when the save starts, with the weights.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hpt_megatron.parallel.runtime import ParallelContext, broadcast_from_driver
from hpt_megatron.trainer.checkpoint_files import (
    BEST,
    CheckpointError,
    gather_objects,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    set_rng_state,
    step_dir,
    verify_checkpoint,
)
from hpt_megatron.trainer.checkpoint_write import (
    PendingSave,
    SnapshotBuffers,
    begin_save,
    save_checkpoint,
)
from hpt_megatron.trainer.engine import StateHold

if TYPE_CHECKING:
    from hpt_megatron.trainer.engine import TrainEngine

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves ``<root>/step_N`` every ``save_every`` steps, at the last step and on a new best
    validation score (also as ``<root>/best``, weights only), keeps the newest ``keep_last``, and
    resumes from ``resume`` (``auto``: the newest intact checkpoint, falling back to older ones);
    the parts are in the module docstring (``critic``: the critic's engine, when there is one;
    ``reference_dir``: where the reference's initial weights are kept, see
    :func:`keep_initial_weights`).

    Every rank holds one and calls its methods together (they are collective). ``describe``
    (driver only) adds files that make a folder self-contained, such as the HF config and
    tokenizer.

    With ``background`` the shards of a periodic save are written in a thread while training
    goes on: the policy engine's next optimizer step waits until the snapshot is taken (a
    :class:`~hpt_megatron.trainer.engine.StateHold`); :meth:`poll` completes a save whose writes
    have finished on every rank, and the next save, a best-score save and :meth:`close` wait
    for it.
    """

    def __init__(
        self,
        root: Path,
        ctx: ParallelContext,
        *,
        save_every: int,
        keep_last: int,
        last_step: int,
        describe: Callable[[Path], None] | None = None,
        background: bool = False,
        critic: TrainEngine | None = None,
        reference_dir: Path | None = None,
    ) -> None:
        self.root = root
        self.ctx = ctx
        self.save_every = save_every
        self.keep_last = keep_last
        self.last_step = last_step
        self.describe = describe
        self.background = background
        self.critic = critic
        self.reference_dir = reference_dir
        self.best_val = float("-inf")
        self.pending: PendingSave | None = None
        self.buffers = SnapshotBuffers()  # the background saves' snapshot, kept between saves
        self._holds: list[StateHold] = []  # snapshots the engine waited for, not yet counted
        self.last_complete: Path | None = None  # the newest checkpoint known complete

    # ------------------------------------------------------------------------------- resume
    def _verify(self, path: Path) -> str | None:
        """Collective: every rank reads back its share of the manifests."""
        ctx = self.ctx
        path = broadcast_from_driver(ctx, path)
        problem = verify_checkpoint(path, ctx.rank, ctx.world_size)
        problems = gather_objects(problem, self.ctx.cpu_group)
        return next((p for p in problems if p), None)

    def _choose(self, resume: str) -> Path | None:
        """Collective: the checkpoint ``resume`` names, verified by all ranks; for ``auto`` the
        driver's listing, newest first, the first intact one."""
        if resume != "auto":
            problem = self._verify(Path(resume))
            if problem:
                raise ValueError(f"run.resume: {resume} cannot be resumed from: {problem}")
            return Path(resume)
        found = list_checkpoints(self.root) if self.ctx.is_driver else []
        for candidate in reversed(broadcast_from_driver(self.ctx, found)):
            problem = self._verify(candidate)
            if problem is None:
                return candidate
            if self.ctx.is_driver:
                log.warning(
                    "checkpoint %s is unusable (%s); falling back to an older one",
                    candidate,
                    problem,
                )
        return None

    def resume(self, resume: str, engine: TrainEngine) -> dict[str, Any] | None:
        """Collective: load the checkpoint chosen into ``engine`` (and the critic, the RNG);
        its state, or None when there is none to resume (``never``, or none found)."""
        path = None if resume == "never" else self._choose(resume)
        if path is None:
            return None
        state = load_checkpoint(path, engine.model_chunks, engine.optimizer)
        engine.scheduler.load_state_dict(state["scheduler"])
        if self.critic is not None:
            critic_path = self.root / "critic" / path.name
            if not critic_path.is_dir():
                raise ValueError(f"{critic_path}: the critic checkpoint of {path} is missing")
            critic = self.critic
            critic_state = load_checkpoint(critic_path, critic.model_chunks, critic.optimizer)
            critic.scheduler.load_state_dict(critic_state["scheduler"])
        set_rng_state(state.get("rng", {}))
        self.best_val = float(state.get("best_val", float("-inf")))
        self.last_complete = Path(path)
        log.info("resumed from %s at step %d", path, state["step"])
        return state

    # --------------------------------------------------------------------------------- save
    def due(self, step: int, val: float | None) -> bool:
        """Whether :meth:`maybe_save` would save after ``step``."""
        is_best = val is not None and val > self.best_val
        due = bool(self.save_every) and step % self.save_every == 0
        return due or step == self.last_step or is_best

    def maybe_save(
        self,
        step: int,
        engine: TrainEngine,
        val: float | None,
        extra: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """Save after ``step`` when it is due, ``val`` is a new best or ``force``; returns
        whether it saved (or started saving). ``extra`` joins the saved state (the driver's data
        position).

        ``val`` must be the same on every rank (they all decide whether to save).
        """
        is_best = val is not None and val > self.best_val
        if not (force or self.due(step, val)):
            return False
        if self.critic is not None:  # before the policy's: a complete step_N has its critic
            self._save_critic(step)
        if is_best:
            self.best_val = float(val)  # type: ignore[arg-type]
        self.wait()  # one save at a time
        state = {
            "step": step,
            "best_val": self.best_val,
            "rng": rng_state(),
            "scheduler": engine.scheduler.state_dict(),
            **extra,
        }
        background = self.background and not is_best and not force and step != self.last_step
        self.pending = begin_save(
            step_dir(self.root, step),
            engine.model_chunks,
            engine.optimizer,
            state,
            group=self.ctx.cpu_group,
            background=background,
            buffers=self.buffers if background else None,
        )
        if not background:
            self.wait()
        else:
            engine.hold_state(self.pending.staged)
            self._holds.append(self.pending.staged)
        if is_best:
            self._save_best(engine, state)
        return True

    def _save_best(self, engine: TrainEngine, state: dict[str, Any]) -> None:
        group = self.ctx.cpu_group
        best = save_checkpoint(self.root / BEST, engine.model_chunks, None, state, group=group)
        if self.ctx.is_driver and self.describe is not None:
            self.describe(best)

    def _save_critic(self, step: int) -> None:
        critic = self.critic
        assert critic is not None
        state = {"scheduler": critic.scheduler.state_dict()}
        target = self.root / "critic" / step_dir(self.root, step).name
        save_checkpoint(
            target, critic.model_chunks, critic.optimizer, state, group=self.ctx.cpu_group
        )

    def _prune_critic(self) -> None:
        """Driver only: drop critic checkpoints whose policy checkpoint is gone."""
        for path in sorted((self.root / "critic").glob("step_*")):
            if not (self.root / path.name).is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def take_staging_wait(self) -> float:
        """The time optimizer steps waited for snapshots since the last call."""
        waited = sum(hold.waited_s for hold in self._holds)  # 0 for one not yet released
        self._holds = [hold for hold in self._holds if not hold.released()]
        return waited

    def poll(self) -> None:
        """Collective, cheap: complete the pending save if every rank has written its shards."""
        if self.pending is None:
            return
        flag = torch.tensor([0 if self.pending.done() else 1], dtype=torch.int32)
        if dist.is_initialized() and self.ctx.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.cpu_group)
        if not flag.item():
            self.wait()

    def wait(self) -> None:
        """Collective: complete the pending save (waiting for its writes)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            path = pending.finish()
        except CheckpointError as err:
            newest = self.last_complete or "none (no checkpoint has completed yet)"
            raise CheckpointError(f"{err}: {newest}. Free space and resume") from None
        self.last_complete = path
        if self.ctx.is_driver:
            if self.describe is not None:
                self.describe(path)
            prune_checkpoints(self.root, self.keep_last)
            if self.critic is not None:
                # Only once the policy's step_N is in place: during a background save it is
                # still step_N.tmp, and the critic's step_N would be taken for an orphan.
                self._prune_critic()

    close = wait

    def abandon(self) -> None:
        """Not collective: the run failed elsewhere; a save still being written is given up
        (this rank's writes waited for, the partial ``step_N.tmp`` removed), so the newest
        complete checkpoint stays the one a resume takes."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.abandon()


def keep_initial_weights(
    path: Path,
    chunks: list[torch.nn.Module],
    initial: list[torch.nn.Module],
    fresh: bool,
    group: dist.ProcessGroup | None,
) -> None:
    """Collective: the reference part, when the reference is the run's initial policy: a fresh
    run copies ``initial`` (the policy's starting chunks) into ``chunks`` and saves them to
    ``path`` (:attr:`Checkpointer.reference_dir`); a resumed run loads them from there."""
    if fresh:
        for mine, theirs in zip(chunks, initial):
            mine.load_state_dict(getattr(theirs, "module", theirs).state_dict())
        save_checkpoint(path, chunks, group=group)
    else:
        load_checkpoint(path, chunks)
