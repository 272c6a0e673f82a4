"""The Megatron training engine: model chunks in DDP, optimizer, LR schedule, one step.

Shape legend: B rows of a micro-batch, S padded sequence length, H hidden size.

Loss normalisation. A loss function returns its micro-batch's *share* of the mini-batch loss
(normalised by totals over the whole mini-batch and every data-parallel rank), so that the shares
summed over micro-batches and ranks are the mini-batch loss whatever the split. Megatron's
schedule divides each micro-batch loss by the number of micro-batches M (times CP), and its DDP
averages gradients over the D data-parallel replicas; we hand it ``share * M * D`` so the two
cancel and the gradient is exactly that of the summed shares.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from hpt_megatron.config.sections import TrainerConfig
from hpt_megatron.models.moe import RoutingReplay
from hpt_megatron.parallel.logprobs import _unwrap, final_hidden_states, output_logprobs_entropy
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.trainer.batching import MicroBatch


class MicroBatchLoss(Protocol):
    """``(logprobs_bs, entropy_bs, micro_batch) -> (loss share, metrics)``.

    Metric values are sums over the micro-batch's tokens or rows (the engine sums them over
    micro-batches and data-parallel ranks); divide by a summed count to report a mean.
    """

    def __call__(
        self, logprobs_bs: torch.Tensor, entropy_bs: torch.Tensor, mb: MicroBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool
    lr: float
    metrics: dict[str, float] = field(default_factory=dict)  # summed over the mini-batch


@contextmanager
def _rope_positions(model: torch.nn.Module, position_ids_bs: torch.Tensor | None) -> Iterator[None]:
    """Within it, ``model``'s rotary embedding rotates token (b, s) by ``position_ids_bs[b, s]``
    (GPTModel's own RoPE uses 0..S-1 for every row and ignores its position ids); None: as is."""
    rope = getattr(_unwrap(model), "rotary_pos_emb", None)
    if position_ids_bs is None:
        yield
        return
    if rope is None or not hasattr(rope, "get_emb"):
        raise ValueError("trainer.packing needs a model with rotary position embeddings")

    def per_token(*args, **kwargs) -> torch.Tensor:
        table_l11d = rope.get_emb(int(position_ids_bs.max()) + 1)
        return table_l11d[:, 0, 0, :][position_ids_bs.t()].unsqueeze(2)  # [S, B, 1, D]

    rope.forward = per_token
    try:
        yield
    finally:
        del rope.forward


class StateHold:
    """A reader still copying an engine's weights and optimizer state (the snapshot of a
    background checkpoint): the engine's next optimizer step, which changes them, waits until
    the reader calls :meth:`release`, and adds the time it waited to :attr:`waited_s`."""

    def __init__(self) -> None:
        self._released = threading.Event()
        self.waited_s = 0.0

    def release(self) -> None:
        self._released.set()

    def released(self) -> bool:
        return self._released.is_set()

    def wait(self) -> None:
        if not self._released.is_set():
            t0 = time.perf_counter()
            self._released.wait()
            self.waited_s += time.perf_counter() - t0


class PhaseMarker(Protocol):
    """The hang watchdog's phase marker (``orchestration/watchdog.Watchdog.phase``)."""

    def __call__(
        self, name: str, step: int | None = None
    ) -> contextlib.AbstractContextManager[None]: ...


class TrainEngine:
    """Owns the model chunks, the optimizer and the LR schedule of one policy.

    ``phase``: the hang watchdog's phase marker (``orchestration/watchdog.py``), around the
    optimizer step; ``routing_replay`` (``models/moe.py``): each micro-batch's recorded experts
    are routed.
    """

    def __init__(
        self,
        model_chunks,
        optimizer,
        scheduler,
        ctx: ParallelContext,
        cfg: TrainerConfig,
        vocab_size: int | None = None,
        *,
        phase: PhaseMarker | None = None,
        routing_replay: RoutingReplay | None = None,
    ) -> None:
        self.model_chunks = model_chunks
        self.vocab_size = vocab_size  # the true vocabulary; Megatron's padding columns are masked
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ctx = ctx
        self.cfg = cfg
        self.phase: PhaseMarker = phase or _no_phase
        self.routing_replay = routing_replay
        self._holds: list[StateHold] = []  # readers the next optimizer step waits for

    def hold_state(self, hold: StateHold) -> None:
        """Keep the weights and optimizer state as they are until ``hold`` is released."""
        self._holds.append(hold)

    # ---------------------------------------------------------------- forward / backward
    def _run(
        self, microbatches: list[MicroBatch], loss_fn: MicroBatchLoss | None, forward_only: bool
    ) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        num_mb = len(microbatches)
        scale = num_mb * self.ctx.dp
        chunk = self.cfg.logprob_chunk_tokens
        tp_group = self.ctx.tp_group if self.ctx.tp > 1 else None
        device = self.ctx.device

        def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
            mb = next(data_iterator)
            packed = mb.packed
            if packed is None:
                ids, pos, mask = mb.input_ids_bs, mb.position_ids_bs, None
            else:  # several sequences per row: per-token RoPE positions, block-diagonal mask
                ids, pos = packed.input_ids_pt, packed.position_ids_pt
                mask = packed.attention_mask_p1tt.to(device)
            ids, pos = ids.to(device), pos.to(device)
            rope_pos = None if packed is None else pos
            if self.routing_replay is not None:
                self.routing_replay.load(model, mb.model_routed_experts)
            with final_hidden_states(model), _rope_positions(model, rope_pos):
                hidden_sbh = model(ids, pos, mask)  # the output layer runs fused with the log-probs

            def loss_func(output_sbh: torch.Tensor, non_loss_data: bool = False):
                targets = (mb.targets_bs if packed is None else packed.targets_pt).to(device)
                logprobs_bs, entropy_bs = output_logprobs_entropy(
                    model,
                    output_sbh,
                    targets,
                    tp_group=tp_group,
                    chunk_tokens=chunk,
                    vocab_size=self.vocab_size,
                )
                if packed is not None:  # back to one row per sample for the loss
                    logprobs_bs, entropy_bs = packed.unpack(logprobs_bs), packed.unpack(entropy_bs)
                if non_loss_data:
                    return logprobs_bs.detach().cpu(), entropy_bs.detach().cpu()
                assert loss_fn is not None  # only forward-only passes go without a loss
                share, metrics = loss_fn(logprobs_bs, entropy_bs, mb)
                return share * scale, {k: v.detach().float() for k, v in metrics.items()}

            return hidden_sbh, loss_func

        iterators = [iter(microbatches) for _ in self.model_chunks]
        fb = get_forward_backward_func()
        return fb(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model_chunks,
            num_microbatches=num_mb,
            seq_length=max(mb.model_shape[1] for mb in microbatches),
            micro_batch_size=max(mb.model_shape[0] for mb in microbatches),
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )

    @torch.no_grad()
    def forward_logprobs(
        self, microbatches: list[MicroBatch]
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-token (log-probs, entropy) ``[B, S]`` of every micro-batch, on last-stage ranks.

        Other pipeline stages get None: the log-probs are used where the loss is computed.
        """
        for chunk in self.model_chunks:
            chunk.eval()
        out = self._run(microbatches, None, forward_only=True)
        for chunk in self.model_chunks:
            chunk.train()
        return list(out) if self.ctx.is_last_stage else None

    def train_step(self, microbatches: list[MicroBatch], loss_fn: MicroBatchLoss) -> StepResult:
        """One optimizer update over ``microbatches`` (this data-parallel rank's share)."""
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        per_mb = self._run(microbatches, loss_fn, forward_only=False)
        metrics = self._reduce_metrics(per_mb if self.ctx.is_last_stage else [])
        # The same summed metrics on every rank: all skip a non-finite loss together.
        loss_ok = math.isfinite(metrics.get("loss", 0.0))
        with self.phase("optimizer"):
            grad_norm, skipped = self._optimizer_step(skip=not loss_ok)
        lr = self.optimizer.param_groups[0]["lr"]
        if not skipped:
            self.scheduler.step(increment=1)
        return StepResult(grad_norm=grad_norm, skipped=skipped, lr=lr, metrics=metrics)

    def _reduce_metrics(self, per_mb: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Sum over micro-batches, then over the data-parallel ranks of the last stage (the max
        for keys ending in ``_max``)."""
        local: dict[str, float] = {}
        for metrics in per_mb:
            for key, value in metrics.items():
                local[key] = _combine(key, local.get(key), float(value.sum()))
        count_me = self.ctx.is_last_stage and self.ctx.tp_rank == 0
        gathered: list = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, local if count_me else {}, group=self.ctx.cpu_group)
        total: dict[str, float] = {}
        for entry in gathered:
            for key, value in entry.items():
                total[key] = _combine(key, total.get(key), value)
        return total

    def _optimizer_step(self, skip: bool = False) -> tuple[float, bool]:
        from megatron.core.optimizer import clip_grads

        opt = self.optimizer
        found_inf = opt.prepare_grads()
        grad_norm = float(opt.get_grad_norm()) if not found_inf else float("inf")
        if skip or found_inf or skips_update(grad_norm, self.cfg.skip_update_grad_norm):
            opt.zero_grad()
            return grad_norm, True
        if self.cfg.grad_clip > 0:
            for sub in getattr(opt, "chained_optimizers", [opt]):
                params = sub.get_parameters()
                if params:
                    clip_grads.clip_grad_by_total_norm_fp32(
                        params,
                        self.cfg.grad_clip,
                        grad_norm,
                        sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                    )
        for hold in self._holds:  # a background checkpoint still copying the state
            hold.wait()
        self._holds.clear()
        opt.step_with_ready_grads()
        return grad_norm, False


def skips_update(grad_norm: float, limit: float | None) -> bool:
    """Whether an update with this (pre-clip) gradient norm is skipped: a non-finite norm, or
    one above ``limit`` (``trainer.skip_update_grad_norm``; None: no limit).

    The official HPT actor's rule (Unify-Post-Training, hpt/verl/verl/mix_src/mix_actor.py:
    505-513): the norm ``clip_grad_norm_`` returns is compared before clipping, strictly
    (``grad_norm > max_grad_norm``), and the gradients are dropped instead of stepped.
    """
    return not math.isfinite(grad_norm) or (limit is not None and grad_norm > limit)


def _combine(key: str, acc: float | None, value: float) -> float:
    """Metric reduction: shares add up; ``*_max`` keys take the maximum."""
    if acc is None:
        return value
    return max(acc, value) if key.endswith("_max") else acc + value


def _no_phase(name: str, step: int | None = None) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()
