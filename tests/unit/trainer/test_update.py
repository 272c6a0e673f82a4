"""The policy update without a process group: a plain torch model stands in for Megatron's engine
(same contract: the gradient of an update is that of the summed micro-batch loss shares; data
parallel sums the ranks' gradients), so the update's cutting of a batch can be checked exactly.

Shape legend: B rows, S padded sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hpt_megatron.algorithms import policy_loss
from hpt_megatron.config.presets import get_preset
from hpt_megatron.data.sample import RolloutBatch, Sample
from hpt_megatron.trainer.batching import MicroBatch, collate
from hpt_megatron.trainer.engine import StepResult
from hpt_megatron.trainer.update import (
    PolicyUpdate,
    UpdateLayout,
    gradient_rows,
    local_microbatches,
    minibatch_totals,
    split_groups,
)

VOCAB = 40


class TorchEngine:
    """``PolicyEngine`` over a Hugging Face causal LM, with plain SGD."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.0) -> None:
        self.model = model
        self.lr = lr
        self.grads: list[torch.Tensor] = []  # flat gradient of every update
        self.forward_calls = 0
        self.rows_trained = 0

    def _logprobs(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits_bsv = self.model(input_ids=mb.input_ids_bs, position_ids=mb.position_ids_bs).logits
        logp_bsv = torch.log_softmax(logits_bsv.float(), dim=-1)
        logprobs_bs = logp_bsv.gather(-1, mb.targets_bs.unsqueeze(-1)).squeeze(-1)
        entropy_bs = -(logp_bsv.exp() * logp_bsv).sum(-1)
        return logprobs_bs, entropy_bs

    @torch.no_grad()
    def forward_logprobs(self, microbatches: list[MicroBatch]) -> list:
        self.forward_calls += 1
        return [self._logprobs(mb) for mb in microbatches]

    def train_step(self, microbatches: list[MicroBatch], loss_fn) -> StepResult:
        self.model.zero_grad()
        metrics: dict[str, float] = {}
        for mb in microbatches:
            self.rows_trained += mb.num_rows
            share, mb_metrics = loss_fn(*self._logprobs(mb), mb)
            share.backward()
            for key, value in mb_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(value.sum())
        grad = torch.cat([p.grad.flatten() for p in self.model.parameters()])
        self.grads.append(grad.clone())
        with torch.no_grad():
            for p in self.model.parameters():
                p -= self.lr * p.grad
        return StepResult(grad_norm=float(grad.norm()), skipped=False, lr=self.lr, metrics=metrics)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def hpt_batch(groups: int = 4, n: int = 3, seed: int = 0) -> list[Sample]:
    """Groups of n rollouts with advantages (RL term) and, for odd groups, a demonstration in the
    SFT term, with uneven lengths; rollout log-probs on every on-policy row."""
    rng = random.Random(seed)
    samples = []
    for g in range(groups):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 6))]
        for _ in range(n):
            resp = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 9))]
            samples.append(
                Sample(
                    prompt_id=str(g),
                    group_id=g,
                    prompt_ids=prompt,
                    response_ids=resp,
                    rollout_logprobs=[-rng.uniform(0.5, 4.0) for _ in resp],
                    advantage=rng.uniform(-1.5, 1.5),
                    rl_weight=1.0,
                )
            )
        if g % 2:
            demo = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 10))]
            samples.append(
                Sample(
                    prompt_id=str(g),
                    group_id=g,
                    prompt_ids=prompt,
                    response_ids=demo,
                    is_demo=True,
                    rl_weight=0.0,
                    sft_weight=1.0,
                )
            )
    return samples


def run_update(samples, spec, *, lr=0.0, seed=0, **layout) -> tuple[TorchEngine, dict]:
    engine = TorchEngine(tiny_model(seed), lr)
    metrics = PolicyUpdate(engine, UpdateLayout(**layout)).update(samples, spec)
    return engine, metrics


SPEC = get_preset("hpt").with_options(entropy_coef=0.01)


def reference_loss_and_grad(samples: list[Sample], spec) -> tuple[float, torch.Tensor]:
    """The whole batch in one ``policy_loss`` call with its own counts (no totals, no split)."""
    engine = TorchEngine(tiny_model())
    mb = collate(samples, list(range(len(samples))))
    logprobs_bs, entropy_bs = engine._logprobs(mb)
    loss, _ = policy_loss(
        spec,
        logprobs=logprobs_bs,
        old_logprobs=logprobs_bs.detach(),
        advantages=mb.advantages_bs,
        response_mask=mb.loss_mask_bs,
        entropy=entropy_bs,
        is_demo=mb.is_demo_b,
        rl_weight=mb.rl_weight_b,
        sft_weight=mb.sft_weight_b,
    )
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten() for p in engine.model.parameters()])


def test_one_or_four_microbatches_give_the_loss_and_gradient_of_the_whole_batch():
    samples = hpt_batch()
    ref_loss, ref_grad = reference_loss_and_grad(samples, SPEC)
    whole, m_whole = run_update(samples, SPEC, max_tokens=10_000)
    split, m_split = run_update(samples, SPEC, max_tokens=24)
    mbs = local_microbatches(samples, UpdateLayout(max_tokens=24))
    assert len(local_microbatches(samples, UpdateLayout(max_tokens=10_000))) == 1
    assert len(mbs) >= 4
    assert m_whole["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert m_split["loss"] == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(whole.grads[0], ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(split.grads[0], ref_grad, rtol=1e-4, atol=1e-6)
    assert ref_grad.abs().max() > 1e-3  # not vacuous


def test_two_minibatches_are_two_updates_on_whole_prompt_groups():
    samples = hpt_batch(groups=4)
    minis = split_groups(samples, 2)
    assert len(minis) == 2 and sum(map(len, minis)) == len(samples)
    assert {s.group_id for s in minis[0]}.isdisjoint({s.group_id for s in minis[1]})
    spec = get_preset("grpo")  # pi_old: recomputed once before the first update
    two, m_two = run_update(samples, spec, lr=0.5, mini_batches=2)
    assert two.forward_calls == 2 and m_two["time/logprob_s"] > 0
    # The same as two one-mini-batch updates in turn, each with the old log-probs of the
    # weights before the step: the second update's ratio is taken against the first weights.
    seq = TorchEngine(tiny_model(), lr=0.5)
    first = [local_microbatches(m, UpdateLayout()) for m in minis]
    for mbs in first:
        for mb, (lp, _) in zip(mbs, seq.forward_logprobs(mbs)):
            mb.old_logprobs_bs = lp * mb.loss_mask_bs
    from hpt_megatron.trainer.update import PolicyLoss

    for mini, mbs in zip(minis, first):
        seq.train_step(mbs, PolicyLoss(spec, minibatch_totals(spec, mini), dp=1))
    torch.testing.assert_close(two.grads[0], seq.grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(two.grads[1], seq.grads[1], rtol=1e-5, atol=1e-7)
    one, _ = run_update(samples, spec, lr=0.5, mini_batches=1)
    assert len(one.grads) == 1 and one.forward_calls == 0  # one update: pi_old == pi_theta
    assert not torch.allclose(one.grads[0], two.grads[0] + two.grads[1])


def test_dp2_ranks_share_the_totals_and_their_gradients_sum_to_dp1():
    samples = hpt_batch(groups=5)
    dp1, m1 = run_update(samples, SPEC)
    ranks = [run_update(samples, SPEC, dp=2, dp_rank=r) for r in (0, 1)]
    rows = [
        {
            i
            for mb in local_microbatches(samples, UpdateLayout(dp=2, dp_rank=r))
            for i in mb.sample_index_b
        }
        for r in (0, 1)
    ]
    assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(range(len(samples)))
    torch.testing.assert_close(
        ranks[0][0].grads[0] + ranks[1][0].grads[0], dp1.grads[0], rtol=1e-4, atol=1e-6
    )
    # Each rank's metric shares add up to the whole batch's.
    assert ranks[0][1]["loss"] + ranks[1][1]["loss"] == pytest.approx(m1["loss"], rel=1e-5)


def test_a_rank_without_rows_trains_on_a_zero_weight_copy():
    samples = hpt_batch(groups=1, n=2)[:2]
    (mb,) = local_microbatches(samples, UpdateLayout(dp=3, dp_rank=2))
    assert mb.rl_weight_b.tolist() == [0.0] and mb.sft_weight_b.tolist() == [0.0]
    engine, _ = run_update(samples, SPEC, dp=3, dp_rank=2)
    assert engine.grads[0].abs().max() == 0


def test_an_empty_batch_is_skipped():
    engine = TorchEngine(tiny_model())
    assert PolicyUpdate(engine, UpdateLayout()).update([], SPEC) == {"train/skipped_empty": 1.0}
    assert engine.grads == []


def test_a_saved_batch_replays_to_the_same_gradient(tmp_path):
    samples = hpt_batch()
    RolloutBatch(samples, step=3).save_jsonl(tmp_path / "step.jsonl")
    replay = RolloutBatch.load_jsonl(tmp_path / "step.jsonl")
    assert replay.step == 3 and replay.samples == samples
    first, _ = run_update(samples, SPEC)
    again, _ = run_update(replay.samples, SPEC)
    assert torch.equal(first.grads[0], again.grads[0])


def _with_equal_groups(samples: list[Sample], groups: set[int]) -> list[Sample]:
    """All-equal reward groups: their rollouts get advantage 0 (GRPO)."""
    return [
        dataclasses.replace(s, advantage=0.0) if s.group_id in groups and not s.is_demo else s
        for s in samples
    ]


@pytest.mark.parametrize("layout", [{}, {"max_tokens": 24}, {"mini_batches": 2}])
def test_zero_gradient_rows_are_elided_and_the_gradient_is_unchanged(layout):
    spec = get_preset("hpt").with_options(entropy_coef=0.0)  # no entropy bonus, no KL
    samples = _with_equal_groups(hpt_batch(groups=6), {0, 2, 3})
    zero = [not s.is_demo and s.advantage == 0.0 for s in samples]
    elided, metrics = run_update(samples, spec, lr=0.5, **layout)
    assert metrics["train/rows_elided_frac"] == pytest.approx(sum(zero) / len(samples))
    full, full_metrics = run_update(samples, spec, lr=0.5, elide_zero_rows=False, **layout)
    assert full_metrics["train/rows_elided_frac"] == 0.0
    epochs = len(full.grads) // max(1, len(elided.grads))
    assert elided.rows_trained == full.rows_trained - sum(zero) * epochs
    assert len(elided.grads) == len(full.grads)
    for got, want in zip(elided.grads, full.grads):
        # The kept rows are batched differently, so only fp32 rounding may separate the two.
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
        assert got.abs().max() > 0


def test_metrics_are_means_over_the_rows_trained_when_rows_are_elided():
    # One on-policy update: pi_old == pi_theta, so the ratio of every trained token is 1. The
    # elided rows used to stay in the metrics' denominators and pulled ratio_mean (and entropy,
    # clip_frac, kl_old) down by the elided share (0.18 for 81% elided in a GRPO run).
    spec = get_preset("grpo")
    samples = [s for s in hpt_batch(groups=4) if not s.is_demo]
    samples = _with_equal_groups(samples, {0, 2, 3})
    elided, metrics = run_update(samples, spec)
    assert metrics["train/rows_elided_frac"] == pytest.approx(0.75)
    assert metrics["ratio_mean"] == pytest.approx(1.0, rel=1e-6)
    # the entropy's token mean over the kept rows equals the unelided run's over those rows
    kept = [s for s in samples if s.group_id == 1]
    _, kept_only = run_update(kept, spec, elide_zero_rows=False)
    assert metrics["entropy"] == pytest.approx(kept_only["entropy"], rel=1e-5)


def test_a_minibatch_of_zero_gradient_rows_still_steps_with_a_zero_weight_row():
    spec = get_preset("grpo")
    samples = [s for s in hpt_batch(groups=2) if not s.is_demo]
    samples = _with_equal_groups(samples, {0, 1})
    for dp_rank in (0, 1):
        engine, metrics = run_update(samples, spec, dp=2, dp_rank=dp_rank)
        assert metrics["train/rows_elided_frac"] == 1.0
        assert len(engine.grads) == 1 and engine.rows_trained == 1  # every rank steps
        assert torch.equal(engine.grads[0], torch.zeros_like(engine.grads[0]))


def test_no_row_is_elided_under_an_entropy_bonus_or_kl():
    samples = _with_equal_groups(hpt_batch(groups=3), {0, 1, 2})
    for options in (
        {"entropy_coef": 0.01},
        {"entropy_coef": 0.0, "kl_coef": 0.1},
        {"entropy_coef": 0.0, "normalization": "microbatch"},  # per-micro-batch denominators
    ):
        spec = get_preset("hpt").with_options(**options)
        kept, elided = gradient_rows(spec, samples)
        assert elided == 0 and kept == samples
    kept, elided = gradient_rows(get_preset("hpt").with_options(entropy_coef=0.0), samples)
    assert elided == 9 and all(s.is_demo for s in kept)  # the demonstrations keep SFT weight


def test_the_rollout_mismatch_of_a_step_without_rollouts_is_absent_not_zero():
    samples = hpt_batch()
    assert "mismatch/k3_kl" in run_update(samples, SPEC)[1]
    demos = [s for s in samples if s.is_demo]  # an all-SFT step (every group failed)
    metrics = run_update(demos, SPEC)[1]
    assert "loss" in metrics and not any(k.startswith("mismatch/") for k in metrics)
