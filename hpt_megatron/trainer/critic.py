"""The critic of advantage ``gae`` (preset ``ppo``): a Megatron value model and its update (its
checkpoints are a part of ``trainer/checkpoint.Checkpointer``).

Shape legend: B rows of a micro-batch, S padded sequence length, T response tokens of a row.

The critic is ``models.value.build_value_chunks`` (the policy's architecture, a one-output head)
in the policy's layout, in DDP with its own AdamW and schedule. Per step, :func:`critic_phase`

1. computes V_old of every micro-batch (forward only) and gathers the step's rows;
2. computes GAE advantages and returns over all RL rows (``algorithms.gae``; the KL penalty in
   the rewards when ``kl_mode: reward``), writing advantages, returns and V_old into the
   micro-batches;
3. trains the critic with the clipped value loss, one update per mini-batch and epoch, like the
   policy.

The value at position t (tokens <= t) is V(s_t) of the response token t + 1, aligned with the
policy's log-probs (``MicroBatch.loss_mask_bs``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hpt_megatron.algorithms import (
    compute_advantages,
    explained_variance,
    gae,
    prompt_explained_variance_bound,
)
from hpt_megatron.algorithms import value_loss as clipped_value_loss
from hpt_megatron.config.algorithm import CriticConfig
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.data.sample import Sample
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.parallel.runtime import ParallelContext
from hpt_megatron.trainer.batching import MicroBatch
from hpt_megatron.trainer.engine import StepResult, TrainEngine
from hpt_megatron.trainer.rows import RowKey, gather_rows, owns_rows, padded, response_rows

log = logging.getLogger(__name__)

ValueLossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Critic:
    """The critic's engine and settings, as the update uses them."""

    engine: CriticEngine
    cfg: CriticConfig


class CriticEngine(TrainEngine):
    """A value model's chunks, optimizer and schedule: ``forward_values`` and ``train_values``
    (the policy's loss normalisation: a micro-batch loss is its share of the mini-batch loss)."""

    def _run_values(
        self, microbatches: list[MicroBatch], loss_fn: ValueLossFn | None, forward_only: bool
    ) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        scale = len(microbatches) * self.ctx.dp
        device = self.ctx.device

        def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
            mb = next(data_iterator)
            values_bs1 = model(mb.input_ids_bs.to(device), mb.position_ids_bs.to(device), None)

            def loss_func(output_bs1: torch.Tensor, non_loss_data: bool = False):
                values_bs = output_bs1[..., 0].float()
                if non_loss_data:
                    return values_bs.detach().cpu()
                assert loss_fn is not None
                share, metrics = loss_fn(values_bs, mb)
                return share * scale, {k: v.detach().float() for k, v in metrics.items()}

            return values_bs1, loss_func

        iterators = [iter(microbatches) for _ in self.model_chunks]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model_chunks,
            num_microbatches=len(microbatches),
            seq_length=max(mb.input_ids_bs.shape[1] for mb in microbatches),
            micro_batch_size=max(mb.num_rows for mb in microbatches),
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )

    @torch.no_grad()
    def forward_values(self, microbatches: list[MicroBatch]) -> list[torch.Tensor] | None:
        """Values ``[B, S]`` of every micro-batch on last-stage ranks (None elsewhere)."""
        for chunk in self.model_chunks:
            chunk.eval()
        out = self._run_values(microbatches, None, forward_only=True)
        for chunk in self.model_chunks:
            chunk.train()
        return list(out) if self.ctx.is_last_stage else None

    def train_values(self, microbatches: list[MicroBatch], loss_fn: ValueLossFn) -> StepResult:
        """One optimizer update of the critic over ``microbatches``."""
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        per_mb = self._run_values(microbatches, loss_fn, forward_only=False)
        metrics = self._reduce_metrics(per_mb if self.ctx.is_last_stage else [])
        grad_norm, skipped = self._optimizer_step()
        lr = self.optimizer.param_groups[0]["lr"]
        if not skipped:
            self.scheduler.step(increment=1)
        return StepResult(grad_norm=grad_norm, skipped=skipped, lr=lr, metrics=metrics)


def critic_trainer_config(trainer: TrainerConfig, critic: CriticConfig) -> TrainerConfig:
    """The policy's trainer settings with the critic's optimizer and schedule."""
    return dataclasses.replace(
        trainer,
        lr=critic.lr,
        min_lr=critic.min_lr,
        lr_schedule=critic.lr_schedule,
        warmup_steps=critic.warmup_steps,
        weight_decay=critic.weight_decay,
        grad_clip=critic.grad_clip,
        skip_update_grad_norm=None,
    )


def build_critic(
    hf: HFModelConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    trainer: TrainerConfig,
    critic: CriticConfig,
    ctx: ParallelContext,
    *,
    total_steps: int,
) -> CriticEngine:
    """The critic's engine on this rank (weights still to be set: :func:`init_critic_weights`)."""
    from hpt_megatron.models.value import build_value_chunks
    from hpt_megatron.trainer.build import build_optimizer, wrap_ddp

    cfg = critic_trainer_config(trainer, critic)
    chunks = build_value_chunks(hf, model, parallel, pp_rank=ctx.pp_rank, init_weights=False)
    chunks = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(chunks, cfg, total_steps)
    return CriticEngine(chunks, optimizer, scheduler, ctx, cfg)


def init_critic_weights(critic: CriticEngine, policy: TrainEngine, cfg: CriticConfig) -> None:
    """Collective: a fresh run's critic: ``cfg.load``, else the policy's (starting) trunk with
    a zero head."""
    from hpt_megatron.trainer.checkpoint_files import load_checkpoint

    if cfg.load:
        load_checkpoint(cfg.load, critic.model_chunks)
        log.info("critic weights from %s", cfg.load)
    else:
        for mine, theirs in zip(critic.model_chunks, policy.model_chunks):
            mine, theirs = getattr(mine, "module", mine), getattr(theirs, "module", theirs)
            wanted = mine.state_dict()
            source = {
                k: v
                for k, v in theirs.state_dict().items()
                if k in wanted and not k.startswith("output_layer.")
            }
            missing = mine.load_state_dict(source, strict=False).missing_keys
            unexpected = [k for k in missing if not k.startswith("output_layer.")]
            assert not unexpected, f"critic keys the policy lacks: {unexpected}"
    reload = getattr(critic.optimizer, "reload_model_params", None)
    if reload is not None:
        reload()  # mixed precision: the optimizer's fp32 copies follow the new weights


class CriticLoss:
    """The clipped value loss of one micro-batch, normalised by the mini-batch's tokens."""

    def __init__(self, cliprange_value: float | None, num_tokens: float) -> None:
        self.cliprange_value = cliprange_value
        self.num_tokens = num_tokens

    def __call__(
        self, values_bs: torch.Tensor, mb: MicroBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert mb.old_values_bs is not None and mb.returns_bs is not None
        device = values_bs.device
        rl_rows_b1 = (mb.rl_weight_b != 0).to(mb.loss_mask_bs.dtype)[:, None]
        return clipped_value_loss(
            values=values_bs,
            old_values=mb.old_values_bs.to(device),
            returns=mb.returns_bs.to(device),
            response_mask=(mb.loss_mask_bs * rl_rows_b1).to(device),  # the RL rows' tokens
            cliprange_value=self.cliprange_value,
            num_tokens=self.num_tokens,
        )


def critic_phase(
    critic: CriticEngine,
    cfg: CriticConfig,
    spec: AlgorithmSpec,
    minis: list[list[Sample]],
    local: list[list[MicroBatch]],
    owned: list[bool],
    epochs: int,
    kl_rows: dict[RowKey, torch.Tensor] | None,
) -> dict[str, float]:
    """Collective: V_old, GAE advantages and returns into the micro-batches, then the critic's
    updates (see the module docstring). ``kl_rows``: per-row KL for ``kl_mode: reward``."""
    t0 = time.perf_counter()
    values_rows = _old_values(critic, local, owned)
    keys = [(k, i) for k, mini in enumerate(minis) for i, s in enumerate(mini) if s.rl_weight != 0]
    if not keys:  # no RL rows this step (all routed to SFT, say): nothing to learn from
        return {"time/critic_s": time.perf_counter() - t0}
    metrics = _write_advantages(spec, minis, local, owned, keys, values_rows, kl_rows)
    rl_tokens = [sum(len(s.response_ids) for s in mini if s.rl_weight != 0) for mini in minis]
    for _ in range(epochs):
        for microbatches, tokens in zip(local, rl_tokens):
            result = critic.train_values(microbatches, CriticLoss(cfg.cliprange_value, tokens))
            metrics.update({f"critic/{m}": v for m, v in result.metrics.items()})
            metrics["critic/grad_norm"] = result.grad_norm
            metrics["critic/lr"] = result.lr
    metrics["time/critic_s"] = time.perf_counter() - t0
    return metrics


def _old_values(
    critic: CriticEngine, local: list[list[MicroBatch]], owned: list[bool]
) -> dict[RowKey, torch.Tensor]:
    """Collective: V_old into every micro-batch; the response values of every row, gathered."""
    values_local: dict[RowKey, torch.Tensor] = {}
    for k, microbatches in enumerate(local):
        outputs = critic.forward_values(microbatches)
        for mb, values_bs in zip(microbatches, outputs or []):
            mb.old_values_bs = values_bs.float() * mb.loss_mask_bs
            if owned[k]:
                values_local.update({(k, i): v for i, v in response_rows(values_bs, mb).items()})
    return gather_rows(critic.ctx, values_local, owns_rows(critic.ctx))


def _write_advantages(
    spec: AlgorithmSpec,
    minis: list[list[Sample]],
    local: list[list[MicroBatch]],
    owned: list[bool],
    keys: list[RowKey],
    values_rows: dict[RowKey, torch.Tensor],
    kl_rows: dict[RowKey, torch.Tensor] | None,
) -> dict[str, float]:
    """GAE advantages and returns of the RL rows ``keys`` into this rank's micro-batches; the
    critic's fit metrics (explained variance, its prompt-only bound, the mean return)."""
    values_bt, mask_bt = padded(keys, values_rows, minis)
    adv_bt, returns_bt = _gae(spec, minis, keys, values_bt, mask_bt, kl_rows)
    lengths = mask_bt.sum(-1).long().tolist()
    by_key = {
        key: (adv_bt[b, : lengths[b]], returns_bt[b, : lengths[b]]) for b, key in enumerate(keys)
    }
    for k, microbatches in enumerate(local):
        for mb in microbatches:
            _write(mb, k, by_key if owned[k] else {})
    metrics = {"critic/explained_variance": explained_variance(values_bt, returns_bt, mask_bt)}
    if kl_rows is None and spec.gae_gamma == 1.0:  # the return is the outcome on every token
        bound = _prompt_bound(minis, keys)
        if bound is not None:
            metrics["critic/explained_variance_prompt_bound"] = bound
    metrics["critic/returns_mean"] = float(returns_bt[mask_bt.bool()].mean())
    return metrics


def _gae(
    spec: AlgorithmSpec,
    minis: list[list[Sample]],
    keys: list[RowKey],
    values_bt: torch.Tensor,
    mask_bt: torch.Tensor,
    kl_rows: dict[RowKey, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages_bt, returns_bt)`` of the step's RL rows."""
    rewards_b = torch.tensor([float(minis[k][i].reward or 0.0) for k, i in keys])
    options = dict(spec.advantage_options)
    if kl_rows is not None:
        kl_bt, _ = padded(keys, kl_rows, minis)
        options["token_rewards"] = -spec.kl_coef * kl_bt
    adv_bt = compute_advantages(
        "gae", rewards=rewards_b, response_mask=mask_bt, values=values_bt, **options
    )
    options.pop("whiten", None)
    _, returns_bt = gae(rewards=rewards_b, response_mask=mask_bt, values=values_bt, **options)
    return adv_bt, returns_bt


def _prompt_bound(minis: list[list[Sample]], keys: list[RowKey]) -> float | None:
    """The explained variance a critic that sees only the prompt could reach on these rows
    (``algorithms.prompt_explained_variance_bound``; groups are per mini-batch)."""
    rows = [minis[k][i] for k, i in keys]
    groups = [(k, minis[k][i].group_id) for k, i in keys]
    dense = {g: n for n, g in enumerate(dict.fromkeys(groups))}
    return prompt_explained_variance_bound(
        [float(s.reward or 0.0) for s in rows],
        [dense[g] for g in groups],
        lengths=[len(s.response_ids) for s in rows],
    )


def _write(mb: MicroBatch, k: int, by_key: dict) -> None:
    """Advantages and returns of this micro-batch's rows (rows outside the RL term: 0)."""
    mb.returns_bs = torch.zeros_like(mb.loss_mask_bs)
    mask_bs = mb.loss_mask_bs.bool()
    for row, idx in enumerate(mb.sample_index_b):
        if (k, idx) in by_key:
            adv_t, returns_t = by_key[(k, idx)]
            mb.advantages_bs[row][mask_bs[row]] = adv_t.float()
            mb.returns_bs[row][mask_bs[row]] = returns_t.float()
