"""Off-policy corrections against closed forms: TIS and MIS at token, sequence and geometric level,
decoupled PPO, the mismatch metrics, and the stale-batch default."""

from __future__ import annotations

import math

import pytest
import torch

from hpt_megatron.algorithms import policy_loss
from hpt_megatron.config import load_config
from hpt_megatron.config.algorithm_spec import AlgorithmSpec
from hpt_megatron.config.presets import get_preset
from hpt_megatron.trainer.engine import _combine

F64 = torch.float64
# Two rows of three response tokens, the second row's last position padding.
LP = [[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]]
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)
# d = log pi_trainer - log pi_rollout per token.
D = torch.tensor([[0.5, -0.2, 1.5], [0.1, -1.2, 0.0]], dtype=F64)
ADV = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=F64)
N_TOKENS = 5.0


def _grad(spec: AlgorithmSpec, old_shift: torch.Tensor | None = None):
    """Gradient of the token-mean loss wrt log pi, with rollout = trainer - D."""
    lp = torch.tensor(LP, dtype=F64, requires_grad=True)
    base = lp.detach() if old_shift is None else lp.detach() - old_shift
    loss, metrics = policy_loss(
        spec,
        logprobs=lp,
        old_logprobs=base,
        advantages=ADV,
        response_mask=MASK,
        rollout_logprobs=base - D,
    )
    loss.backward()
    return lp.grad, metrics


def _pg(**options) -> AlgorithmSpec:  # REINFORCE-style term -A log pi: gradient -A w / N
    return AlgorithmSpec(denominator="current", mask="none", **options)


def _seq_d(geometric: bool) -> torch.Tensor:
    s = (D * MASK).sum(-1)
    return s / MASK.sum(-1) if geometric else s


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_tis_weight_at_each_level(level: str) -> None:
    cap = 1.5
    grad, metrics = _grad(_pg(tis_cap=cap, tis_level=level))
    if level == "token":
        rho = torch.exp(D)
    else:
        rho = torch.exp(_seq_d(level == "geometric"))[:, None].expand_as(D)
    w = rho.clamp(max=cap)
    torch.testing.assert_close(grad, -ADV * w * MASK / N_TOKENS)
    assert metrics["tis_clip_frac"].item() == pytest.approx(
        float(((rho > cap) * MASK).sum()) / N_TOKENS
    )


def test_mis_token_drops_tokens_outside_the_band_and_keeps_rho_inside() -> None:
    grad, metrics = _grad(_pg(mis_high=2.0))  # band [0.5, 2]
    rho = torch.exp(D)
    keep = (rho >= 0.5) & (rho <= 2.0)
    torch.testing.assert_close(grad, -ADV * torch.where(keep, rho, 0.0) * MASK / N_TOKENS)
    dropped = (~keep & MASK.bool()).sum().item()  # e^1.5 and e^-1.2
    assert dropped == 2
    assert metrics["mismatch/masked_token_frac"].item() == pytest.approx(dropped / N_TOKENS)
    assert metrics["mismatch/masked_seq_frac"].item() == pytest.approx(1.0)  # both rows hit


@pytest.mark.parametrize("level", ["sequence", "geometric"])
def test_mis_sequence_levels_drop_whole_rows(level: str) -> None:
    # row 0: sum d = 1.8 (e^1.8 = 6.0, geometric e^0.6 = 1.82); row 1: sum -1.1 (0.33 / 0.58)
    grad, metrics = _grad(_pg(mis_high=2.0, mis_low=0.4, mis_level=level, tis_cap=10.0))
    seq = torch.exp(_seq_d(level == "geometric"))
    keep_b = (seq >= 0.4) & (seq <= 2.0)
    w = torch.where(keep_b[:, None], torch.exp(D), 0.0)  # the IS weight stays at token level
    torch.testing.assert_close(grad, -ADV * w * MASK / N_TOKENS)
    expected_rows = {"sequence": [False, False], "geometric": [True, True]}[level]
    assert keep_b.tolist() == expected_rows
    assert metrics["mismatch/masked_seq_frac"].item() == pytest.approx(1 - sum(expected_rows) / 2)


def test_decoupled_ppo_clips_against_the_proximal_policy_and_weights_behaviour() -> None:
    # pi_theta / pi_prox = r (clipped around pi_prox), times min(pi_prox / pi_rollout, cap).
    shift = torch.tensor([[0.1, 0.4, -0.05], [-0.3, 0.05, 0.0]], dtype=F64)  # log r
    spec = get_preset("grpo").with_options(tis_cap=2.0, aggregation="token_mean")
    grad, _ = _grad(spec, old_shift=shift)
    r = torch.exp(shift)
    lo, hi = 1 - spec.clip_low, 1 + spec.clip_high
    clipped = ((ADV > 0) & (r > hi)) | ((ADV < 0) & (r < lo))
    w = torch.exp(D).clamp(max=2.0)
    expected = torch.where(clipped, 0.0, -ADV * r * w) * MASK / N_TOKENS
    torch.testing.assert_close(grad, expected)
    assert clipped.any() and not clipped.all()


def test_mismatch_metrics_closed_form() -> None:
    _, metrics = _grad(_pg())  # no correction: metrics only, the term unchanged
    valid = MASK.bool()
    assert metrics["mismatch/logp_abs_diff_mean"].item() == pytest.approx(
        float(D.abs()[valid].sum()) / N_TOKENS
    )
    assert metrics["mismatch/logp_abs_diff_max"].item() == pytest.approx(1.5)
    # d_r = log pi_rollout - log pi_trainer = -D: k3 = exp(D) - 1 - D
    k3 = (torch.exp(D) - 1 - D)[valid]
    assert metrics["mismatch/k3_kl"].item() == pytest.approx(float(k3.sum()) / N_TOKENS)
    assert "tis_clip_frac" not in metrics and "mismatch/masked_token_frac" not in metrics


def test_demonstration_rows_are_not_corrected() -> None:
    lp = torch.tensor(LP, dtype=F64, requires_grad=True)
    spec = get_preset("luffy").with_options(tis_cap=1.0)
    kwargs = dict(
        advantages=ADV,
        response_mask=MASK,
        is_demo=torch.tensor([False, True]),
        old_logprobs=torch.tensor(LP, dtype=F64),
    )
    loss, _ = policy_loss(spec, logprobs=lp, rollout_logprobs=lp.detach() - D, **kwargs)
    loss.backward()
    lp2 = torch.tensor(LP, dtype=F64, requires_grad=True)
    ref, _ = policy_loss(
        spec.with_options(tis_cap=1e9), logprobs=lp2, **kwargs, rollout_logprobs=lp2.detach() - D
    )
    ref.backward()
    torch.testing.assert_close(lp.grad[1], lp2.grad[1])  # the demo row: no weight
    assert not torch.allclose(lp.grad[0], lp2.grad[0])


def test_option_errors() -> None:
    with pytest.raises(ValueError, match="mis_low: masked IS is on only with mis_high"):
        get_preset("grpo").with_options(mis_low=0.5)
    with pytest.raises(ValueError, match="mis_low: must be in"):
        get_preset("grpo").with_options(mis_low=3.0, mis_high=2.0)
    with pytest.raises(ValueError, match="tis_level"):
        get_preset("grpo").with_options(tis_level="row")
    assert get_preset("grpo").with_options(mis_high=4.0).mis_band == (0.25, 4.0)


def test_stale_batches_get_decoupled_ppo_by_default() -> None:
    sync = load_config("examples/tiny_cpu.yaml")
    assert sync.algorithm.spec(max_staleness=sync.run.max_staleness).tis_cap is None
    stale = load_config(
        "examples/tiny_cpu.yaml", ["run.placement=disaggregated", "run.max_staleness=1"]
    )
    spec = stale.algorithm.spec(max_staleness=1)
    assert spec.tis_cap == 2.0 and spec.tis_level == "token" and spec.denominator == "old"
    chosen = load_config(
        "examples/tiny_cpu.yaml",
        ["run.placement=disaggregated", "run.max_staleness=1", "algorithm.options.mis_high=3"],
    )
    assert chosen.algorithm.spec(max_staleness=1).tis_cap is None  # the user's correction


def test_metric_reduction_takes_max_of_max_keys() -> None:
    assert _combine("mismatch/logp_abs_diff_max", 0.5, 0.2) == 0.5
    assert _combine("clip_frac", 0.5, 0.2) == pytest.approx(0.7)
    assert _combine("x_max", None, 0.3) == 0.3
    assert math.isclose(_combine("kl_ref", 1.0, 2.0), 3.0)
