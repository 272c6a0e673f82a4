"""The frozen reference policy of the KL terms, and what the update takes from it.

Shape legend: B rows of a micro-batch, S padded sequence length, T response tokens of a row.

The reference is a forward-only copy of a policy in the policy's own parallel layout (the same
TP/PP/DP ranks, no DDP, no optimizer). Its per-token log-probs come from the policy engine's own
forward path (``TrainEngine.forward_logprobs``: Megatron's schedule, vocab-parallel log-probs), so
the two are computed the same way. Its weights: ``algorithm.reference.load`` /
``hf_weights``, else the policy's starting weights (``model.load`` / ``model.hf_weights``, or the
run's initial random weights, which a fresh run copies and saves to ``<run_dir>/reference`` so
a resumed run finds them again: ``trainer.checkpoint.keep_initial_weights``).

Per step, :func:`attach_reference` sets ``ref_logprobs_bs`` on each micro-batch (``kl_mode:
loss``) or folds the KL into the rewards and rewrites the advantages (``kl_mode: reward``), and
measures ``kl_ref_mean`` / ``kl_ref_max``: the estimate of KL(pi_old || pi_ref) over the RL
tokens before the update (0 at the first step of a run started from the reference).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hpt_megatron.algorithms import kl_estimate, kl_penalised_advantages
from hpt_megatron.config.algorithm import ReferenceConfig
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.data.sample import Sample
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.trainer.batching import MicroBatch
from hpt_megatron.trainer.engine import TrainEngine
from hpt_megatron.trainer.rows import (
    RowKey,
    gather_rows,
    owns_rows,
    padded,
    response_rows,
    write_rows,
)

log = logging.getLogger(__name__)


def frozen_engine(
    hf: HFModelConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    trainer: TrainerConfig,
    ctx: ParallelContext,
) -> TrainEngine:
    """This rank's chunks of ``hf`` in the layout, without gradients, in eval mode, behind a
    ``TrainEngine`` without optimizer (its forward path only): the reference's and the
    teacher's model (weights loaded by the caller)."""
    from hpt_megatron.models.provider import build_model_chunks

    chunks = build_model_chunks(hf, model, parallel, pp_rank=ctx.pp_rank, init_weights=False)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return TrainEngine(chunks, None, None, ctx, trainer, vocab_size=hf.vocab_size)


class ReferencePolicy:
    """Frozen model chunks of this rank and their forward; ``offload`` keeps them in host memory
    between forwards (GPU)."""

    def __init__(self, engine: TrainEngine, offload: bool = False) -> None:
        self.engine = engine  # no optimizer: used for its forward path only
        self.offload = offload

    @classmethod
    def build(
        cls,
        hf: HFModelConfig,
        model: ModelConfig,
        parallel: ParallelConfig,
        trainer: TrainerConfig,
        ctx: ParallelContext,
        offload: bool = False,
    ) -> ReferencePolicy:
        return cls(frozen_engine(hf, model, parallel, trainer, ctx), offload)

    @property
    def chunks(self) -> list[torch.nn.Module]:
        return self.engine.model_chunks

    def load_weights(
        self,
        policy: TrainEngine,
        hf: HFModelConfig,
        model: ModelConfig,
        ref: ReferenceConfig,
        saved: Path,
        fresh: bool,
    ) -> None:
        """Collective: the reference's weights (see the module docstring). ``policy`` holds the
        starting weights when ``fresh``; ``saved`` is where the random ones are kept."""
        from hpt_megatron.trainer.checkpoint import keep_initial_weights
        from hpt_megatron.trainer.checkpoint_files import load_checkpoint

        load = ref.load or (None if ref.hf_weights else model.load)
        hf_weights = ref.hf_weights or (None if ref.load else model.hf_weights)
        ctx = self.engine.ctx
        if load:
            load_checkpoint(load, self.chunks)
        elif hf_weights:
            from hpt_megatron.models.loading import load_hf_weights

            load_hf_weights(self.chunks, hf, hf_weights, tp_rank=ctx.tp_rank, tp_size=ctx.tp)
        else:
            keep_initial_weights(saved, self.chunks, policy.model_chunks, fresh, ctx.cpu_group)
        log.info("reference weights from %s", load or hf_weights or f"the initial policy ({saved})")
        if self.offload:
            self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        for chunk in self.chunks:
            chunk.to(device)

    def forward_logprobs(self, microbatches: list[MicroBatch]) -> list[torch.Tensor] | None:
        """log pi_ref ``[B, S]`` of every micro-batch on last-stage ranks (None elsewhere)."""
        if self.offload:
            self._move(self.engine.ctx.device)
        try:
            out = self.engine.forward_logprobs(microbatches)
        finally:
            if self.offload:
                self._move(torch.device("cpu"))
        return None if out is None else [logprobs_bs for logprobs_bs, _ in out]


def attach_reference(
    reference: ReferencePolicy,
    spec: AlgorithmSpec,
    minis: list[list[Sample]],
    local: list[list[MicroBatch]],
    owned: list[bool],
) -> tuple[dict[str, float], dict[RowKey, torch.Tensor]]:
    """Collective: reference log-probs of every micro-batch; the KL loss input or the KL-folded
    advantages; ``kl_ref_mean`` / ``kl_ref_max`` (KL(pi_old || pi_ref) over the step's RL tokens).

    ``local[k]`` are this rank's micro-batches of ``minis[k]`` with ``old_logprobs_bs`` set (on
    last-stage ranks); ``owned[k]``: whether this rank holds rows of ``minis[k]``. Also returns
    the gathered per-row KL (for GAE, which folds it itself).
    """
    ctx = reference.engine.ctx
    kl_local: dict[RowKey, torch.Tensor] = {}
    for k, microbatches in enumerate(local):
        outputs = reference.forward_logprobs(microbatches)
        if outputs is None:
            continue
        for mb, ref_bs in zip(microbatches, outputs):
            mb.ref_logprobs_bs = ref_bs.float() * mb.loss_mask_bs
            assert mb.old_logprobs_bs is not None  # the update computes pi_old first
            kl_bs = kl_estimate(mb.old_logprobs_bs, mb.ref_logprobs_bs, spec.kl_estimator)
            if owned[k]:
                for idx, kl_t in response_rows(kl_bs, mb).items():
                    kl_local[(k, idx)] = kl_t
    kl_rows = gather_rows(ctx, kl_local, owns_rows(ctx))
    keys = [(k, i) for k, mini in enumerate(minis) for i, s in enumerate(mini) if s.rl_weight != 0]
    if not keys:
        return {}, kl_rows
    kl_bt, mask_bt = padded(keys, kl_rows, minis)
    if spec.kl_mode == "reward" and spec.advantage != "gae":
        _fold_into_advantages(spec, minis, local, owned, keys, kl_bt, mask_bt)
    valid_bt = mask_bt.bool()
    metrics = {
        "kl_ref_mean": float(kl_bt[valid_bt].mean()) if valid_bt.any() else 0.0,
        "kl_ref_max": float(kl_bt[valid_bt].max()) if valid_bt.any() else 0.0,
    }
    return metrics, kl_rows


def _fold_into_advantages(
    spec: AlgorithmSpec,
    minis: list[list[Sample]],
    local: list[list[MicroBatch]],
    owned: list[bool],
    keys: list[RowKey],
    kl_bt: torch.Tensor,
    mask_bt: torch.Tensor,
) -> None:
    """``kl_mode: reward``: the advantages of the step's RL rows again, with ``-kl_coef * KL``
    in the rewards (every rank computes them from the gathered rows), into each micro-batch."""
    rows = [minis[k][i] for k, i in keys]
    dense: dict[int, int] = {}
    # Group ids are per mini-batch's prompt groups; mini-batches never cut a group.
    group_b = torch.tensor([dense.setdefault(s.group_id, len(dense)) for s in rows])
    adv_bt = kl_penalised_advantages(
        spec.advantage,
        rewards=torch.tensor([float(s.reward or 0.0) for s in rows], dtype=torch.float64),
        kl=kl_bt,
        coef=spec.kl_coef,
        response_mask=mask_bt,
        group_ids=group_b,
        is_demo=torch.tensor([s.is_demo for s in rows]),
        **spec.advantage_options,
    )
    lengths = mask_bt.sum(-1).long().tolist()
    by_key = {key: adv_bt[b, : lengths[b]] for b, key in enumerate(keys)}
    for k, microbatches in enumerate(local):
        for mb in microbatches if owned[k] else []:
            write_rows(
                mb.advantages_bs,
                mb,
                {i: by_key[(k, i)] for i in mb.sample_index_b if (k, i) in by_key},
            )
