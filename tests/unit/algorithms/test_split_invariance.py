"""``hpt``: one micro-batch or four give the same loss and gradient (shares summed);
``hpt_paper``: the paper code's per-micro-batch normalisation, written out by hand."""

import pytest
import torch

from hpt_megatron.algorithms import loss_totals, pack_totals, policy_loss, unpack_totals

B, T = 8, 6


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 2, 5, 3, 6, 1, 4, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return dict(
        logprobs=(-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(),
        old=-torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
        adv=torch.randn(B, T, generator=g, dtype=torch.float64) * mask,
        entropy=torch.rand(B, T, generator=g, dtype=torch.float64).requires_grad_(),
        mask=mask,
        is_demo=torch.tensor([0, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool),
    )


def run(name: str, x: dict, n_micro: int, dp: int = 1, with_totals: bool = True):
    """Sum of the shares over ``n_micro`` equal micro-batches; returns (loss, grads, metrics)."""
    for key in ("logprobs", "entropy"):
        x[key].grad = None
    chunks = list(torch.arange(B).chunk(n_micro))
    totals = None
    if with_totals:
        per_mb = [
            loss_totals(name, response_lengths=x["mask"][c].sum(-1), is_demo=x["is_demo"][c])
            for c in chunks
        ]
        totals = unpack_totals(torch.stack(per_mb).sum(0))  # the trainer also all-reduces over DP
    total_loss, metrics = 0.0, {}
    for c in chunks:
        loss, m = policy_loss(
            name,
            logprobs=x["logprobs"][c],
            old_logprobs=x["old"][c],
            advantages=x["adv"][c],
            response_mask=x["mask"][c],
            entropy=x["entropy"][c],
            is_demo=x["is_demo"][c],
            global_num_tokens=totals[0] if totals else None,
            global_num_seqs=totals[1] if totals else None,
            dp_world_size=dp,
        )
        loss.backward()
        total_loss = total_loss + loss.detach()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v
    return total_loss, x["logprobs"].grad.clone(), x["entropy"].grad.clone(), metrics


def test_hpt_one_vs_four_microbatches():
    x = batch()
    loss1, g1, e1, m1 = run("hpt", x, 1)
    loss4, g4, e4, m4 = run("hpt", x, 4)
    torch.testing.assert_close(loss4, loss1)
    torch.testing.assert_close(g4, g1)
    torch.testing.assert_close(e4, e1)
    for key in ("loss", "pg_loss", "sft_nll", "entropy", "ratio_mean", "num_tokens_rl"):
        torch.testing.assert_close(m4[key], m1[key], msg=key)


def test_hpt_without_totals_is_not_split_invariant():
    """The check above can fail: local normalisation per micro-batch gives another loss."""
    x = batch()
    loss1, *_ = run("hpt", x, 1, with_totals=False)
    loss4, *_ = run("hpt", x, 4, with_totals=False)
    assert not torch.allclose(loss1, loss4)


@pytest.mark.parametrize("n_micro,dp", [(1, 1), (4, 1), (4, 2)])
def test_hpt_paper_microbatch_normalisation(n_micro, dp):
    """Per micro-batch mb (paper: mix_actor.py, gradient_accumulation = 1, FSDP mean over DP):
    loss_mb = [sum_{on-policy tokens} -A r / 8192 + mean_{demo tokens in mb}(-log pi)
               - 0.001 * mean_{all tokens in mb}(H)] / dp;   the trainer sums the shares."""
    x = batch(1)
    loss, grad, _, _ = run("hpt_paper", x, n_micro, dp=dp)
    lp, old, adv, mask = x["logprobs"].detach(), x["old"], x["adv"], x["mask"]
    demo = x["is_demo"][:, None].double()
    expected_loss, expected_grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for c in torch.arange(B).chunk(n_micro):
        r = torch.exp(lp[c] - old[c])
        on, dm, mk = (1 - demo[c]) * mask[c], demo[c] * mask[c], mask[c]
        n_demo = dm.sum().clamp_min(1)
        rl = (-adv[c] * r * on).sum() / 8192
        sft = (-lp[c] * dm).sum() / n_demo
        ent = (x["entropy"][c].detach() * mk).sum() / mk.sum()
        expected_loss += (rl + sft - 0.001 * ent) / dp
        expected_grad[c] = (-adv[c] * r * on / 8192 - dm / n_demo) / dp
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def test_hpt_paper_depends_on_the_split():
    x = batch(2)
    loss1, g1, *_ = run("hpt_paper", x, 1)
    loss4, g4, *_ = run("hpt_paper", x, 4)
    assert not torch.allclose(g1, g4)


def test_pack_unpack_roundtrip():
    tokens, seqs = {"rl": 3, "sft": 4, "all": 7}, {"rl": 1, "sft": 2, "all": 3}
    assert unpack_totals(pack_totals(tokens, seqs)) == (
        {k: float(v) for k, v in tokens.items()},
        {k: float(v) for k, v in seqs.items()},
    )
    with pytest.raises(ValueError, match="shape"):
        unpack_totals(torch.zeros(5))
