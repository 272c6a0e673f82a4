"""The policy update: one step's samples -> optimizer updates of the policy.

Shape legend: B rows of a micro-batch, S padded sequence length.

Given the step's samples (each carrying its advantage and loss weights; the same list on every
rank) and the spec in force, :meth:`PolicyUpdate.update`

1. splits the rows into ``mini_batches`` mini-batches without cutting a prompt group;
2. assigns each mini-batch's rows to data-parallel ranks by tokens (every rank computes the same
   assignment from the lengths alone) and collates only this rank's rows into token-budget
   micro-batches;
3. takes each mini-batch's loss denominators from the lengths and weights of all its rows, so no
   rank collates another rank's rows and no collective is needed; rows whose every loss term is
   exactly zero (``algorithms.zero_gradient_rows``: zero advantage, no SFT weight, no entropy or
   KL term) stay in those denominators but are not collated, so they cost no forward or backward
   (the rows before step 2; a mini-batch left without rows keeps one zero-weight row so that
   every rank still takes part in the step);
4. recomputes the old log-probs once, before the first update, when the spec needs pi_old and
   there is more than one update per step, or when a KL term or a teacher is on; then scores
   the rows with the reference (``trainer/reference.py``) and the teacher, which adds the
   distillation part to the advantages (``trainer/teacher.py``);
5. with advantage ``gae``, runs the critic's phase (``trainer/critic.py``: values, GAE
   advantages and returns, the critic's updates), and stops there during its warm-up;
6. runs ``epochs`` passes of one optimizer update per mini-batch through the engine, with
   :class:`PolicyLoss` as the per-micro-batch loss.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hpt_megatron.algorithms import (
    loss_totals,
    policy_loss,
    unpack_totals,
    zero_gradient_rows,
)
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.data.sample import Sample
from hpt_megatron.models.moe import RouterStats
from hpt_megatron.trainer.batching import (
    MicroBatch,
    collate,
    collate_packed,
    packed_microbatches,
    split_to_multiple,
    token_budget_microbatches,
)
from hpt_megatron.trainer.critic import Critic, critic_phase
from hpt_megatron.trainer.engine import MicroBatchLoss, StepResult
from hpt_megatron.trainer.reference import ReferencePolicy, attach_reference
from hpt_megatron.trainer.rows import RowKey
from hpt_megatron.trainer.teacher import TeacherPolicy, attach_teacher


class PolicyEngine(Protocol):
    """What the update needs of an engine (``trainer.engine.TrainEngine`` on Megatron)."""

    def forward_logprobs(
        self, microbatches: list[MicroBatch]
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None: ...

    def train_step(self, microbatches: list[MicroBatch], loss_fn: MicroBatchLoss) -> StepResult: ...


class PolicyLoss:
    """``algorithms.policy_loss`` as the engine's per-micro-batch loss.

    ``old_logprobs_bs`` come from the micro-batch when the update recomputed them; otherwise the
    current log-probs, detached, stand in (one update per step: pi_old == pi_theta exactly).
    """

    def __init__(
        self,
        spec: AlgorithmSpec,
        totals_6: torch.Tensor,
        dp: int,
        metric_totals_6: torch.Tensor | None = None,
    ) -> None:
        """``totals_6``: the mini-batch's loss denominators (every row); ``metric_totals_6``: the
        metrics' (the rows trained, without the zero-gradient ones; None: ``totals_6``)."""
        self.spec = spec
        self.num_tokens, self.num_seqs = unpack_totals(totals_6)
        metric = totals_6 if metric_totals_6 is None else metric_totals_6
        self.metric_num_tokens, self.metric_num_seqs = unpack_totals(metric)
        self.dp = dp

    def __call__(
        self, logprobs_bs: torch.Tensor, entropy_bs: torch.Tensor, mb: MicroBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = logprobs_bs.device
        old_bs = logprobs_bs.detach() if mb.old_logprobs_bs is None else mb.old_logprobs_bs
        rollout_bs = mb.rollout_logprobs_bs
        ref_bs = mb.ref_logprobs_bs
        return policy_loss(
            self.spec,
            logprobs=logprobs_bs,
            old_logprobs=old_bs.to(device),
            advantages=mb.advantages_bs.to(device),
            response_mask=mb.loss_mask_bs.to(device),
            entropy=entropy_bs if self.spec.entropy_coef else entropy_bs.detach(),
            is_demo=mb.is_demo_b.to(device),
            rl_weight=mb.rl_weight_b.to(device),
            sft_weight=mb.sft_weight_b.to(device),
            rollout_logprobs=None if rollout_bs is None else rollout_bs.to(device),
            ref_logprobs=None if ref_bs is None else ref_bs.to(device),
            global_num_tokens=self.num_tokens,
            global_num_seqs=self.num_seqs,
            metric_num_tokens=self.metric_num_tokens,
            metric_num_seqs=self.metric_num_seqs,
            dp_world_size=self.dp,
        )


@dataclass(frozen=True, kw_only=True)
class UpdateLayout:
    """How a step's rows are cut: mini-batches, epochs, data-parallel ranks and micro-batches."""

    dp: int = 1
    dp_rank: int = 0
    max_tokens: int = 4096  # padded tokens of one micro-batch
    pad_id: int = 0
    pad_to_multiple: int = 1  # sequence lengths divisible by it (batching.token_multiple)
    microbatch_multiple: int = 1  # micro-batch count divisible by it (PP under a virtual pipeline)
    packing: bool = False  # several sequences per row (batching.packed_microbatches)
    elide_zero_rows: bool = True  # no compute on rows without a loss term (gradient_rows)
    mini_batches: int = 1
    epochs: int = 1
    # Every data-parallel rank runs as many micro-batches as the busiest one (padding with
    # zero-weight copies): expert parallelism spans data-parallel ranks, and each micro-batch's
    # token dispatch is a collective over them.
    equal_microbatch_counts: bool = False
    # Routing replay: micro-batches carry the rollout engine's experts (MicroBatch's
    # routed_experts_bsmk), which the engine's RoutingReplay makes the routers use.
    routing_replay: bool = False


def split_groups(samples: list[Sample], parts: int) -> list[list[Sample]]:
    """``parts`` mini-batches (fewer when there are fewer groups), never cutting a prompt group."""
    groups: dict[int, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.group_id, []).append(sample)
    ordered = list(groups.values())
    per = -(-len(ordered) // parts)
    return [[s for g in ordered[k : k + per] for s in g] for k in range(0, len(ordered), per)]


def dp_shards(samples: list[Sample], dp: int) -> list[list[int]]:
    """Balance tokens over ``dp`` ranks (longest first, to the least loaded); deterministic."""
    loads = [0] * dp
    shards: list[list[int]] = [[] for _ in range(dp)]
    for idx in sorted(range(len(samples)), key=lambda i: (-samples[i].num_tokens, i)):
        rank = min(range(dp), key=lambda r: (loads[r], r))
        shards[rank].append(idx)
        loads[rank] += samples[idx].num_tokens
    return [sorted(s) for s in shards]


def minibatch_totals(spec: AlgorithmSpec, samples: list[Sample]) -> torch.Tensor:
    """The loss denominators ``[6]`` of a whole mini-batch (every rank's rows), from lengths."""
    return loss_totals(
        spec,
        response_lengths=torch.tensor([len(s.response_ids) for s in samples]),
        is_demo=torch.tensor([s.is_demo for s in samples]),
        rl_weight=torch.tensor([s.rl_weight for s in samples], dtype=torch.float64),
        sft_weight=torch.tensor([s.sft_weight for s in samples], dtype=torch.float64),
    )


def gradient_rows(spec: AlgorithmSpec, samples: list[Sample]) -> tuple[list[Sample], int]:
    """The rows of ``samples`` that can contribute to the gradient, and how many were left out.

    Never empty: a zero-weight copy of the first row stands in for none, so the ranks still run
    the step together.
    """
    zero_b = zero_gradient_rows(
        spec,
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float64),
        rl_weight=torch.tensor([s.rl_weight for s in samples], dtype=torch.float64),
        sft_weight=torch.tensor([s.sft_weight for s in samples], dtype=torch.float64),
    )
    kept = [s for s, zero in zip(samples, zero_b.tolist()) if not zero]
    elided = len(samples) - len(kept)
    if not kept:
        kept = [dataclasses.replace(samples[0], rl_weight=0.0, sft_weight=0.0, advantage=0.0)]
    return kept, elided


def local_microbatches(samples: list[Sample], layout: UpdateLayout) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of ``samples`` (``sample_index_b`` indexes them).

    A rank left without rows (fewer rows than ranks) trains on a copy of row 0 with zero loss
    weights, so it still joins the collective step and adds nothing to the gradient. Micro-batches
    are split until their count is a multiple of ``layout.microbatch_multiple``; when no
    micro-batch can be split further, zero-weight copies of a row make up the count. With
    ``layout.equal_microbatch_counts`` such idle micro-batches also bring every rank up to the
    largest rank's count (every rank computes every rank's count from the same samples).
    """
    shards = dp_shards(samples, layout.dp)
    mine = shards[layout.dp_rank]
    idle = [dataclasses.replace(samples[0], rl_weight=0.0, sft_weight=0.0, advantage=0.0)]
    rows = samples if mine else idle
    mine = mine or [0]
    pad: dict[str, Any] = {
        "pad_id": layout.pad_id,
        "pad_to_multiple": layout.pad_to_multiple,
        "routed_experts": layout.routing_replay,
    }
    groups = _microbatch_groups([rows[i].num_tokens for i in mine], layout)
    if layout.packing:
        out = [collate_packed(rows, [[mine[j] for j in r] for r in g], **pad) for g in groups]
    else:
        out = [collate(rows, [mine[j] for j in group], **pad) for group in groups]
    target = _round_up(len(out), layout.microbatch_multiple)
    if layout.equal_microbatch_counts:
        for shard in shards:  # an empty shard trains one idle micro-batch
            lengths = [samples[i].num_tokens for i in shard]
            count = len(_microbatch_groups(lengths, layout)) if shard else 1
            target = max(target, _round_up(count, layout.microbatch_multiple))
    filler = [dataclasses.replace(rows[mine[0]], rl_weight=0.0, sft_weight=0.0, advantage=0.0)]
    while len(out) < target:  # (not replayed: they would count in moe/replay_changed_frac)
        out.append(collate(filler, [0], **{**pad, "routed_experts": False}))
    return out


def _microbatch_groups(lengths: list[int], layout: UpdateLayout) -> list:
    """Row groups of one rank's micro-batches (packed rows of sequences with ``packing``), split
    until their count is a multiple of ``layout.microbatch_multiple`` where rows allow."""
    if layout.packing:
        packed = packed_microbatches(lengths, layout.max_tokens)
        return split_to_multiple(packed, layout.microbatch_multiple)
    groups = token_budget_microbatches(lengths, layout.max_tokens)
    return split_to_multiple(groups, layout.microbatch_multiple)


def _round_up(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


@dataclass
class _StepRows:
    """One step's rows as the update cuts them: ``kept[k]`` the rows of mini-batch k that are
    trained (``local[k]``, this rank's micro-batches, index them), ``owned[k]`` whether this rank
    holds some of them, ``losses[k]`` its loss; ``kl_rows`` the reference's per-row KL."""

    kept: list[list[Sample]]
    local: list[list[MicroBatch]]
    owned: list[bool]
    losses: list[PolicyLoss]
    elided: int
    kl_rows: dict[RowKey, torch.Tensor] | None = None


class PolicyUpdate:
    """Runs the optimizer updates of one step on ``engine`` (every rank calls it with the same
    samples; see the module docstring)."""

    def __init__(
        self,
        engine: PolicyEngine,
        layout: UpdateLayout,
        reference: ReferencePolicy | None = None,
        critic: Critic | None = None,
        teacher: TeacherPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.layout = layout
        self.reference = reference  # built when a KL term is on
        self.critic = critic  # built for advantage gae
        self.teacher = teacher  # built when the distillation part is on
        # Mixture-of-experts models: expert-load metrics of the training forwards.
        chunks = getattr(engine, "model_chunks", None)
        self.router_stats = RouterStats.attach(chunks) if chunks else None

    def update(self, samples: list[Sample], spec: AlgorithmSpec, step: int = 0) -> dict[str, float]:
        """Train on ``samples`` with ``spec`` at ``step`` (0-based; the critic's warm-up); returns
        the last update's metrics and timings, with ``train/skipped_updates``: how many of the
        step's updates (mini-batches x epochs) were skipped."""
        if not samples:
            return {"train/skipped_empty": 1.0}
        rows = self._cut(samples, spec)
        timings = {"time/logprob_s": 0.0, "time/train_s": 0.0}
        extra = self._score(rows, spec, timings)
        if self.critic is not None and spec.advantage == "gae":
            extra |= self._critic_phase(rows, spec)
            if step < self.critic.cfg.critic_warmup_steps:  # the critic learns alone first
                return {**extra, **timings, "train/critic_warmup": 1.0}
        metrics: dict[str, float] = {}
        skipped = 0  # updates of this step skipped (non-finite, or over skip_update_grad_norm)
        for _ in range(self.layout.epochs):
            for microbatches, loss_fn in zip(rows.local, rows.losses):
                t0 = time.perf_counter()
                result = self.engine.train_step(microbatches, loss_fn)
                timings["time/train_s"] += time.perf_counter() - t0
                skipped += int(result.skipped)
                metrics = {
                    **result.metrics,
                    "grad_norm": result.grad_norm,
                    "lr": result.lr,
                    "train/skipped_update": float(result.skipped),
                }
        if not any(s.rl_weight != 0 and not s.is_demo for s in samples):
            # No rollout in the RL term (an all-SFT step): the trainer-versus-rollout log-prob
            # mismatch is undefined, and left out rather than reported as a perfect 0.
            metrics = {k: v for k, v in metrics.items() if not k.startswith("mismatch/")}
        metrics["train/skipped_updates"] = float(skipped)
        metrics.update(extra)
        metrics.update(self._router_metrics())
        metrics["train/rows"] = float(len(samples))
        metrics["train/rows_elided_frac"] = rows.elided / len(samples)
        metrics["train/tokens"] = float(sum(len(s.response_ids) for s in samples))
        return {**metrics, **timings}

    def _cut(self, samples: list[Sample], spec: AlgorithmSpec) -> _StepRows:
        """Steps 1-3 of the module docstring: mini-batches, this rank's micro-batches, losses."""
        layout = self.layout
        minis = split_groups(samples, layout.mini_batches)
        if layout.elide_zero_rows:
            trained = [gradient_rows(spec, mini) for mini in minis]
        else:
            trained = [(mini, 0) for mini in minis]
        local = [local_microbatches(rows, layout) for rows, _ in trained]
        # Elided rows stay in the loss's denominators (the gradient is unchanged) but not in the
        # metrics' (a token mean of the ratio or entropy over the rows trained).
        losses = [
            PolicyLoss(
                spec,
                minibatch_totals(spec, mini),
                layout.dp,
                minibatch_totals(spec, rows) if elided_here else None,  # None: the loss's
            )
            for mini, (rows, elided_here) in zip(minis, trained)
        ]
        kept = [rows for rows, _ in trained]  # what the micro-batches index
        owned = [bool(dp_shards(rows, layout.dp)[layout.dp_rank]) for rows in kept]
        elided = sum(count for _, count in trained)
        return _StepRows(kept, local, owned, losses, elided)

    def _score(
        self, rows: _StepRows, spec: AlgorithmSpec, timings: dict[str, float]
    ) -> dict[str, float]:
        """Step 4: pi_old when the updates need it, then the reference's log-probs and KL, then
        the teacher's log-probs and the distillation part of the advantages."""
        updates = len(rows.kept) * self.layout.epochs
        # One update per step: pi_old is pi_theta before the update, which the loss has already.
        # The KL terms and the distillation part compare pi_old with pi_ref or pi_teacher, so a
        # reference or a teacher needs pi_old in any case.
        uses_ref = self.reference is not None and spec.needs_ref_logprobs
        uses_teacher = spec.needs_teacher_logprobs  # a model here, or scores with the samples
        if uses_ref or uses_teacher or (spec.needs_old_logprobs and updates > 1):
            t0 = time.perf_counter()
            for microbatches in rows.local:
                self._attach_old_logprobs(microbatches)
            timings["time/logprob_s"] = time.perf_counter() - t0
        extra: dict[str, float] = {}
        if uses_ref:
            assert self.reference is not None
            t0 = time.perf_counter()
            extra, rows.kl_rows = attach_reference(
                self.reference, spec, rows.kept, rows.local, rows.owned
            )
            timings["time/ref_s"] = time.perf_counter() - t0
        if uses_teacher:  # after the reference, whose reward-mode KL rewrites the advantages
            t0 = time.perf_counter()
            ctx = self.engine.ctx  # type: ignore[attr-defined]
            extra |= attach_teacher(ctx, self.teacher, spec, rows.kept, rows.local, rows.owned)
            if self.teacher is not None:  # the servers' scoring time is the driver's
                timings["time/teacher_s"] = time.perf_counter() - t0
        return extra

    def _critic_phase(self, rows: _StepRows, spec: AlgorithmSpec) -> dict[str, float]:
        """Step 5: the critic's values, GAE advantages and returns, and its updates."""
        assert self.critic is not None
        reward_kl = rows.kl_rows if spec.kl_mode == "reward" else None
        critic, cfg = self.critic.engine, self.critic.cfg
        epochs = self.layout.epochs
        return critic_phase(critic, cfg, spec, rows.kept, rows.local, rows.owned, epochs, reward_kl)

    def _router_metrics(self) -> dict[str, float]:
        """Mixture-of-experts models: expert loads (and routing replay's changed fraction)."""
        if self.router_stats is None:
            return {}
        ctx = self.engine.ctx  # type: ignore[attr-defined]
        group = ctx.cpu_group if ctx.world_size > 1 else None
        counts = ctx.tp_rank == 0 or ctx.sequence_parallel
        metrics = self.router_stats.collect(group, counts=counts)
        replay = getattr(self.engine, "routing_replay", None)
        if replay is not None:
            metrics.update(replay.collect(group, counts=counts))
        return metrics

    def _attach_old_logprobs(self, microbatches: list[MicroBatch]) -> None:
        """pi_old of each micro-batch, before any update (only the last pipeline stage gets it)."""
        outputs = self.engine.forward_logprobs(microbatches)
        if outputs is None:
            return
        for mb, (logprobs_bs, _) in zip(microbatches, outputs):
            mb.old_logprobs_bs = logprobs_bs.float() * mb.loss_mask_bs
