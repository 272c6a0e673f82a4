"""The unified loss: RL term (UPGE) + SFT term + entropy bonus + KL penalty.

Shapes: B rows (responses), T response positions.

    loss = L_RL + sft_coef * L_SFT - entropy_coef * H + kl_coef * KL        (one micro-batch share)

L_RL aggregates ``rl_weight * term`` (``parts.py``) over rows with rl_weight != 0; L_SFT is the
token mean of ``sft_weight * (-log pi)`` over rows with sft_weight != 0; H is the token-mean entropy
over all trained rows; KL the token-mean ``kl_estimator`` over RL rows (when ``kl_mode='loss'``).

``normalization='global'``: every mean uses the mini-batch totals passed as ``global_num_tokens``
/ ``global_num_seqs`` (see ``loss_totals``), so the shares SUM over micro-batches and ranks to the
loss of the whole mini-batch computed at once. ``normalization='microbatch'`` (``hpt_paper``)
reproduces the HPT paper code (verl ``mix_actor.py`` with ``loss_remove_token_mean=True``,
``gradient_accumulation = 1``, FSDP averaging over ranks): L_SFT, H and any token/sequence mean
use this micro-batch's own counts, token_sum_norm divides by its constant, and the micro-batch
loss is divided by ``dp_world_size``. Summed over micro-batches and ranks, that is the paper's
gradient: it depends on how the batch is cut into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hpt_megatron.algorithms import aggregation as agg
from hpt_megatron.algorithms._checks import as_vector, check_bt, check_mask
from hpt_megatron.algorithms.corrections import mismatch_stats, rollout_correction
from hpt_megatron.algorithms.parts import (
    TokenTerms,
    demo_terms,
    kl_estimate,
    on_policy_terms,
)
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.config.presets import get_preset

Metrics = dict[str, torch.Tensor]


def resolve_spec(preset_or_spec: str | AlgorithmSpec, **options: Any) -> AlgorithmSpec:
    """A preset name or spec, with ``options`` overriding its fields."""
    spec = get_preset(preset_or_spec) if isinstance(preset_or_spec, str) else preset_or_spec
    return spec.with_options(**options) if options else spec


def row_weights(
    spec: AlgorithmSpec,
    batch: int,
    is_demo: torch.Tensor | None,
    rl_weight: torch.Tensor | None,
    sft_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(is_demo_b, rl_weight_b, sft_weight_b)``, defaulting by ``spec.demo_term``.

    Defaults: on-policy rows go to the RL term (weight 1); demonstrations to the RL term
    (``demo_term='rl'``: srft, luffy, sft) or the SFT term (``'sft'``: hpt). Given weights win.
    """
    demo_b = (
        torch.zeros(batch, dtype=torch.bool)
        if is_demo is None
        else as_vector("is_demo", is_demo, torch.bool, batch)
    )
    to_sft_b = demo_b & (spec.demo_term == "sft")
    rl_b = (
        (~to_sft_b).double()
        if rl_weight is None
        else as_vector("rl_weight", rl_weight, torch.float64, batch)
    )
    sft_b = (
        to_sft_b.double()
        if sft_weight is None
        else as_vector("sft_weight", sft_weight, torch.float64, batch)
    )
    return demo_b, rl_b, sft_b


def loss_totals(
    spec: AlgorithmSpec | str,
    *,
    response_lengths: torch.Tensor,
    is_demo: torch.Tensor | None = None,
    rl_weight: torch.Tensor | None = None,
    sft_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The six loss denominators of rows with ``response_lengths`` ``[B]`` tokens, float64 ``[6]``.

    Computed from lengths and weights alone, so a trainer can take the totals of a whole
    mini-batch (every data-parallel rank's rows) without collating it:
    ``global_num_tokens, global_num_seqs = unpack_totals(total)``, then pass both to
    ``policy_loss``. Order: tokens of rl, sft, all; rows of rl, sft, all.
    """
    spec = resolve_spec(spec)
    tokens_b = as_vector("response_lengths", response_lengths, torch.float64, len(response_lengths))
    _, rl_b, sft_b = row_weights(spec, tokens_b.shape[0], is_demo, rl_weight, sft_weight)
    num_tokens, num_seqs = agg.count_totals(tokens_b, agg.term_rows(rl_b, sft_b))
    return agg.pack_totals(num_tokens, num_seqs)


def zero_gradient_rows(
    spec: AlgorithmSpec | str,
    *,
    advantages: torch.Tensor,
    rl_weight: torch.Tensor,
    sft_weight: torch.Tensor,
) -> torch.Tensor:
    """``[B]`` bool: rows whose every loss term is exactly zero, so their gradient is zero.

    A row's RL term is its weight times its advantage (row-level here) times a finite factor,
    its SFT term its SFT weight times ``sft_coef``; the entropy bonus and the KL penalty reach
    every row, so with either on no row qualifies; nor does any with ``normalization:
    microbatch`` (its denominators are the micro-batch's own rows), with advantage ``gae`` or
    the distillation part on (the trainer sets per-token advantages from the critic's values or
    the teacher's log-probs after this choice). Such rows may be
    left out of the forward and backward passes as long as they stay in the loss denominators
    (``loss_totals``).
    """
    spec = resolve_spec(spec)
    batch = len(advantages)
    adv_b = as_vector("advantages", advantages, torch.float64, batch)
    rl_b = as_vector("rl_weight", rl_weight, torch.float64, batch)
    sft_b = as_vector("sft_weight", sft_weight, torch.float64, batch)
    microbatch = spec.normalization == "microbatch"
    per_token_later = spec.advantage == "gae" or spec.distill_coef != 0
    if spec.entropy_coef != 0 or spec.kl_coef != 0 or microbatch or per_token_later:
        return torch.zeros(batch, dtype=torch.bool)
    no_rl = (adv_b == 0) | (rl_b == 0)
    no_sft = (sft_b == 0) | (spec.sft_coef == 0)
    return no_rl & no_sft


def policy_loss(
    preset_or_spec: str | AlgorithmSpec,
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    is_demo: torch.Tensor | None = None,
    rl_weight: torch.Tensor | None = None,
    sft_weight: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    global_num_tokens: agg.Totals | float | None = None,
    global_num_seqs: agg.Totals | float | None = None,
    metric_num_tokens: agg.Totals | float | None = None,
    metric_num_seqs: agg.Totals | float | None = None,
    dp_world_size: int = 1,
    **options: Any,
) -> tuple[torch.Tensor, Metrics]:
    """The unified post-training loss of one micro-batch (its share of the mini-batch loss).

    Args:
        preset_or_spec: a preset name (``get_preset``) or an ``AlgorithmSpec``.
        logprobs: ``[B, T]`` log pi_theta of the response tokens, with grad (fp32).
        old_logprobs: ``[B, T]`` log pi_old; needed when ``spec.needs_old_logprobs``.
        advantages: ``[B, T]`` from ``compute_advantages``.
        response_mask: ``[B, T]``, 1 on response tokens.
        entropy: ``[B, T]`` policy entropy with grad; needed when ``entropy_coef > 0``.
        is_demo: ``[B]`` bool, True for offline demonstrations.
        rl_weight, sft_weight: ``[B]`` alpha and beta of each row (defaults: ``row_weights``).
        ref_logprobs: ``[B, T]`` reference-model log-probs (KL penalty as a loss term).
        rollout_logprobs: ``[B, T]`` the rollout engine's log-probs: mismatch metrics, and the
            TIS / MIS correction when the spec has one (``corrections.py``).
        global_num_tokens, global_num_seqs: mini-batch totals per term (``{"rl", "sft", "all"}``,
            or one number for all), from ``loss_totals``/``unpack_totals``; None: this batch's.
        metric_num_tokens, metric_num_seqs: the totals the metrics are normalised by, when they
            differ from the loss's (rows left out of the step as zero-gradient stay in the
            loss's denominators but not in the metrics'); None: ``global_num_*``.
        dp_world_size: data-parallel ranks; only ``normalization='microbatch'`` divides by it.
        **options: spec fields to override (``clip_high=0.28``, ``aggregation='token_mean'``).

    Returns:
        ``(loss, metrics)``: the scalar loss share and detached scalar metrics. Every metric is an
        additive share normalised by the global totals when given: SUM them over micro-batches and
        ranks (without totals each is this micro-batch's own mean). See docs/algorithms.md.
    """
    spec = resolve_spec(preset_or_spec, **options)
    if spec.batch_rule == "sft_then_rl":
        raise ValueError(f"{spec.name}: call spec.phase_for_step(step) and pass that spec")
    mask_bt = check_mask(response_mask)
    _check_inputs(
        spec,
        mask_bt.shape,
        logprobs,
        old_logprobs,
        advantages,
        entropy,
        ref_logprobs,
        rollout_logprobs,
    )
    demo_b, rl_b, sft_b = row_weights(spec, mask_bt.shape[0], is_demo, rl_weight, sft_weight)
    ctx = _context(
        spec,
        mask_bt,
        logprobs.dtype,
        (demo_b, rl_b, sft_b),
        (global_num_tokens, global_num_seqs),
        (metric_num_tokens, metric_num_seqs),
    )
    metrics: Metrics = {}
    pg_loss, terms = _rl_term(
        spec, ctx, logprobs, old_logprobs, advantages, rollout_logprobs, metrics
    )
    loss = _total_loss(spec, ctx, pg_loss, logprobs, entropy, ref_logprobs, metrics, dp_world_size)
    metrics.update(_core_metrics(loss, pg_loss, logprobs, old_logprobs, terms, ctx, spec))
    return loss, metrics


@dataclass
class _Context:
    """Masks, term membership and the denominators of one ``policy_loss`` call."""

    mask: torch.Tensor  # [B, T] in the log-prob dtype
    on_bt: torch.Tensor  # [B, T] bool: on-policy response tokens
    demo_b: torch.Tensor  # [B] bool
    rl_b: torch.Tensor  # [B] float64 alpha
    sft_b: torch.Tensor  # [B] float64 beta
    rows: dict[str, torch.Tensor]  # term -> [B] bool
    loss_tokens: dict[str, float | torch.Tensor]  # denominators of the loss
    loss_seqs: dict[str, float | torch.Tensor]
    metric_tokens: dict[str, float | torch.Tensor]  # denominators of the metrics
    metric_seqs: dict[str, float | torch.Tensor]


def _context(
    spec: AlgorithmSpec,
    mask_bt: torch.Tensor,
    dtype: torch.dtype,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    loss_totals: tuple[agg.Totals | float | None, agg.Totals | float | None],
    metric_totals: tuple[agg.Totals | float | None, agg.Totals | float | None],
) -> _Context:
    """The call's context; a metric total left None is the loss's (``loss_totals``)."""
    demo_b, rl_b, sft_b = weights
    rows = agg.term_rows(rl_b, sft_b)
    local_tokens, local_seqs = agg.count_totals(mask_bt.sum(-1), rows)
    loss_tokens = agg.resolve_totals(loss_totals[0], local_tokens, "global_num_tokens")
    loss_seqs = agg.resolve_totals(loss_totals[1], local_seqs, "global_num_seqs")
    metric_tokens = agg.resolve_totals(
        loss_totals[0] if metric_totals[0] is None else metric_totals[0],
        local_tokens,
        "metric_num_tokens",
    )
    metric_seqs = agg.resolve_totals(
        loss_totals[1] if metric_totals[1] is None else metric_totals[1],
        local_seqs,
        "metric_num_seqs",
    )
    if spec.normalization == "microbatch":
        loss_tokens = agg.resolve_totals(None, local_tokens, "")
        loss_seqs = agg.resolve_totals(None, local_seqs, "")
    on_bt = mask_bt.bool() & ~demo_b[:, None]
    return _Context(
        mask_bt.to(dtype),
        on_bt,
        demo_b,
        rl_b,
        sft_b,
        rows,
        loss_tokens,
        loss_seqs,
        metric_tokens,
        metric_seqs,
    )


def _rl_term(
    spec: AlgorithmSpec,
    ctx: _Context,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    rollout_logprobs: torch.Tensor | None,
    metrics: Metrics,
) -> tuple[torch.Tensor, TokenTerms]:
    """L_RL: on-policy and demonstration terms, TIS, aggregation."""
    terms = on_policy_terms(spec, logprobs, old_logprobs, advantages, ctx.on_bt)
    demo_bt = ctx.demo_b[:, None]
    term_bt = torch.where(demo_bt, demo_terms(spec, logprobs, advantages), terms.term_bt)
    if rollout_logprobs is not None:
        base_bt = old_logprobs if old_logprobs is not None else logprobs
        _mismatch_metrics(base_bt, rollout_logprobs, ctx, metrics)
        if spec.corrects_rollout:
            corr = rollout_correction(spec, base_bt, rollout_logprobs, ctx.on_bt)
            term_bt = torch.where(ctx.on_bt, term_bt * corr.weight_bt.to(term_bt.dtype), term_bt)
            on, rl_rows = ctx.on_bt.float(), ctx.rows["rl"]
            if spec.tis_cap is not None:
                metrics["tis_clip_frac"] = _share(
                    corr.truncated_bt.float(), on, rl_rows, ctx.metric_tokens["rl"]
                )
            if spec.mis_high is not None:
                metrics["mismatch/masked_token_frac"] = _share(
                    corr.masked_bt.float(), on, rl_rows, ctx.metric_tokens["rl"]
                )
                masked_rows = (corr.masked_b & rl_rows.bool()).double().sum()
                metrics["mismatch/masked_seq_frac"] = (
                    masked_rows / agg._at_least_one(ctx.metric_seqs["rl"])
                ).float()
    pg_loss = agg.aggregate(
        term_bt,
        ctx.mask,
        ctx.rl_b,
        spec.aggregation,
        num_tokens=ctx.loss_tokens["rl"],
        num_seqs=ctx.loss_seqs["rl"],
        constant=spec.agg_constant,
    )
    return pg_loss, terms


def _total_loss(
    spec: AlgorithmSpec,
    ctx: _Context,
    pg_loss: torch.Tensor,
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    metrics: Metrics,
    dp_world_size: int,
) -> torch.Tensor:
    """``L_RL + sft_coef * L_SFT`` plus the regularisers; under ``normalization='microbatch'``
    divided by ``dp_world_size`` (FSDP's average over ranks in the paper's code)."""
    sft_loss = agg.aggregate(
        -logprobs, ctx.mask, ctx.sft_b, "token_mean", num_tokens=ctx.loss_tokens["sft"], num_seqs=1
    )
    loss = pg_loss + spec.sft_coef * sft_loss
    loss = loss + _regularisers(spec, ctx, logprobs, entropy, ref_logprobs, metrics)
    if spec.normalization == "microbatch":
        loss = loss / dp_world_size
    return loss


def _mismatch_metrics(
    base_bt: torch.Tensor, rollout_bt: torch.Tensor, ctx: _Context, metrics: Metrics
) -> None:
    """Trainer-versus-rollout log-prob mismatch on the on-policy tokens (shares of RL tokens)."""
    abs_bt, k3_bt, top = mismatch_stats(base_bt, rollout_bt, ctx.on_bt)
    on, rl_rows, total = ctx.on_bt.double(), ctx.rows["rl"], ctx.metric_tokens["rl"]
    metrics["mismatch/logp_abs_diff_mean"] = _share(abs_bt, on, rl_rows, total)
    metrics["mismatch/logp_abs_diff_max"] = top.float()
    metrics["mismatch/k3_kl"] = _share(k3_bt, on, rl_rows, total)


def _regularisers(
    spec: AlgorithmSpec,
    ctx: _Context,
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    metrics: Metrics,
) -> torch.Tensor | float:
    """-entropy_coef * H (all rows) + kl_coef * KL (RL rows, ``kl_mode='loss'``)."""
    extra: torch.Tensor | float = 0.0
    if entropy is not None:
        all_w = ctx.rows["all"].double()
        entropy_mean = agg.aggregate(
            entropy, ctx.mask, all_w, "token_mean", num_tokens=ctx.loss_tokens["all"], num_seqs=1
        )
        extra = extra - spec.entropy_coef * entropy_mean
        metrics["entropy"] = _share(entropy, ctx.mask, all_w, ctx.metric_tokens["all"])
    if ref_logprobs is not None:
        kl_bt = kl_estimate(logprobs, ref_logprobs.to(logprobs.dtype), spec.kl_estimator)
        rl_rows = ctx.rows["rl"].double()
        if spec.kl_mode == "loss" and spec.kl_coef > 0:
            kl_mean = agg.aggregate(
                kl_bt,
                ctx.mask,
                rl_rows,
                "token_mean",
                num_tokens=ctx.loss_tokens["rl"],
                num_seqs=1,
            )
            extra = extra + spec.kl_coef * kl_mean
        metrics["kl_ref"] = _share(kl_bt, ctx.mask, rl_rows, ctx.metric_tokens["rl"])
    return extra


def _check_inputs(
    spec: AlgorithmSpec,
    shape: torch.Size,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    entropy: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
) -> None:
    named = {
        "logprobs": logprobs,
        "old_logprobs": old_logprobs,
        "advantages": advantages,
        "entropy": entropy,
        "ref_logprobs": ref_logprobs,
        "rollout_logprobs": rollout_logprobs,
    }
    for name, tensor in named.items():
        check_bt(name, tensor, shape)
    needs = {
        "old_logprobs": spec.denominator in ("old", "gspo"),
        "entropy": spec.entropy_coef > 0,
        "ref_logprobs": spec.kl_coef > 0 and spec.kl_mode == "loss",
        "rollout_logprobs": spec.corrects_rollout,
    }
    for name, needed in needs.items():
        if needed and named[name] is None:
            raise ValueError(f"{name}: preset '{spec.name}' needs it (see the spec's needs_*)")
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages: contain NaN or infinite values")


def _share(
    x_bt: torch.Tensor, mask: torch.Tensor, rows_b: torch.Tensor, total: float | torch.Tensor
) -> torch.Tensor:
    """Detached share of the token mean of ``x`` over ``rows_b`` (sums to the mini-batch mean)."""
    summed = (x_bt.detach() * mask * rows_b[:, None].to(mask.dtype)).sum()
    return (summed / agg._at_least_one(total)).float()


def _core_metrics(
    loss: torch.Tensor,
    pg_loss: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    terms: TokenTerms,
    ctx: _Context,
    spec: AlgorithmSpec,
) -> Metrics:
    rl_rows, tokens = ctx.rows["rl"], ctx.metric_tokens
    on = ctx.on_bt.to(ctx.mask.dtype)
    out = {
        "loss": loss.detach().float(),
        "pg_loss": pg_loss.detach().float(),
        "sft_nll": _share(-logprobs, ctx.mask, ctx.rows["sft"], tokens["sft"]),
        "clip_frac": _share(terms.clipped_bt.float(), on, rl_rows, tokens["rl"]),
        "ratio_mean": _share(terms.ratio_bt, on, rl_rows, tokens["rl"]),
        "num_tokens_rl": (ctx.mask * rl_rows[:, None]).sum().detach().float(),
        "num_tokens_sft": (ctx.mask * ctx.rows["sft"][:, None]).sum().detach().float(),
    }
    if old_logprobs is not None and spec.denominator in ("old", "gspo"):
        # k3 estimate of KL(pi_old || pi_theta) on the on-policy tokens
        kl_old_bt = kl_estimate(old_logprobs.to(logprobs.dtype), logprobs.detach(), "k3")
        kl_old_bt = torch.where(ctx.on_bt, kl_old_bt, torch.zeros_like(kl_old_bt))
        out["kl_old"] = _share(kl_old_bt, on, rl_rows, tokens["rl"])
    return out
