"""fused_logprobs_entropy (output layer + log-probs, no logits tensor) against the unfused path
(``hidden @ weight.T`` then vocab_parallel_logprobs_entropy) and a float64 reference, values and
the gradients of the hidden states and the weight (one process, no TP; TP=2 is in
tests/distributed/test_logprobs_tp.py).

Shape legend: N tokens, H hidden size, V vocabulary.
"""

import pytest
import torch

from hpt_megatron.parallel.logprobs import fused_logprobs_entropy, vocab_parallel_logprobs_entropy

N, H, V = 29, 16, 50


def make(dtype: torch.dtype = torch.float32, seed: int = 0, vocab: int = V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(vocab, H, generator=gen) * 0.7).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    g_lp, g_h = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    return hidden, weight, targets, g_lp, g_h


def run(fused: bool, hidden, weight, targets, g_lp, g_h, chunk=None, vocab_size=None):
    x = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    if fused:
        lp, h = fused_logprobs_entropy(x, w, targets, chunk_tokens=chunk, vocab_size=vocab_size)
    else:
        lp, h = vocab_parallel_logprobs_entropy(
            x @ w.t(), targets, chunk_tokens=chunk, vocab_size=vocab_size
        )
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    return lp.detach(), h.detach(), x.grad, w.grad


def reference64(hidden, weight, targets, g_lp, g_h):
    x = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    logp = torch.log_softmax(x @ w.t(), dim=-1)
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    h = -(logp.exp() * logp).sum(-1)
    ((lp * g_lp.double()).sum() + (h * g_h.double()).sum()).backward()
    return lp.detach(), h.detach(), x.grad, w.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    # Scale-relative: gradient entries pass through zero, so element-wise ratios mislead.
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("chunk", [4, 7, N, None])
def test_fp32_equals_the_unfused_path(chunk):
    data = make()
    fused = run(True, *data, chunk=chunk)
    unfused = run(False, *data, chunk=4)
    assert fused[0].dtype == fused[1].dtype == torch.float32 and fused[0].shape == (N,)
    for got, want in zip(fused, unfused):
        assert _rel(got, want) < 1e-6


@pytest.mark.parametrize("chunk", [1, 5])
def test_fp32_equals_float64_reference(chunk):
    data = make(seed=1)
    # fp32 rounding against exact maths (the unfused path is no closer: see the test above)
    for got, want in zip(run(True, *data, chunk=chunk), reference64(*data)):
        assert _rel(got, want) < 1e-5


def test_bf16_matches_the_unfused_path_and_keeps_dtypes():
    data = make(torch.bfloat16, seed=2)
    fused = run(True, *data, chunk=4)
    unfused = run(False, *data, chunk=4)
    assert fused[2].dtype == fused[3].dtype == torch.bfloat16
    # Same bf16 logits and fp32 maths; the gradients are rounded to bf16 (8 bits of mantissa)
    # and the hidden-state gradient is summed over vocabulary blocks in fp32 instead of one GEMM.
    assert _rel(fused[0], unfused[0]) < 1e-5 and _rel(fused[1], unfused[1]) < 1e-5
    assert _rel(fused[2], unfused[2]) < 1 / 64 and _rel(fused[3], unfused[3]) < 1 / 64


@pytest.mark.parametrize("chunk", [2, 100])
def test_vocab_padding_rows_get_no_probability_and_no_gradient(chunk):
    # Megatron pads the vocabulary (here 50 -> 64): the padding rows of the weight hold anything.
    hidden, weight, targets, g_lp, g_h = make(seed=3)
    padded = torch.cat([weight, torch.full((14, H), 3.0)])
    got = run(True, hidden, padded, targets, g_lp, g_h, chunk=chunk, vocab_size=V)
    want = run(False, hidden, weight, targets, g_lp, g_h, chunk=4)
    for a, b in zip(got[:3], want[:3]):
        assert _rel(a, b) < 1e-6
    assert _rel(got[3][:V], want[3]) < 1e-6
    assert torch.equal(got[3][V:], torch.zeros(14, H))


def test_large_logits_are_stable():
    hidden, weight, targets, g_lp, g_h = make(seed=4)
    weight = weight * 60.0  # logits of a few hundred: exp overflows fp32 without the max shift
    got = run(True, hidden, weight, targets, g_lp, g_h, chunk=3)
    assert all(torch.isfinite(t).all() for t in got)
    want = reference64(hidden, weight, targets, g_lp, g_h)
    assert _rel(got[0], want[0]) < 1e-5 and _rel(got[2], want[2]) < 1e-5


def test_no_gradient_asked_for_the_weight():
    hidden, weight, targets, g_lp, g_h = make(seed=5)
    x = hidden.clone().requires_grad_(True)
    lp, h = fused_logprobs_entropy(x, weight, targets, chunk_tokens=4)
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    assert weight.grad is None
    assert _rel(x.grad, run(False, hidden, weight, targets, g_lp, g_h)[2]) < 1e-6


def test_inputs_are_not_modified_and_forward_only_needs_no_grad():
    hidden, weight, targets, _, _ = make(seed=6)
    before = hidden.clone(), weight.clone()
    with torch.no_grad():
        lp, h = fused_logprobs_entropy(hidden, weight, targets, chunk_tokens=2)
    assert torch.equal(hidden, before[0]) and torch.equal(weight, before[1])
    ref = reference64(hidden, weight, targets, torch.zeros(N), torch.zeros(N))
    assert _rel(lp, ref[0]) < 1e-6 and _rel(h, ref[1]) < 1e-6


def test_shape_mismatches_are_clear_errors():
    hidden, weight, targets, _, _ = make()
    with pytest.raises(ValueError, match=r"hidden states \(29, 16\) and targets \(28,\)"):
        fused_logprobs_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match=r"output weight \(50, 8\) and hidden states"):
        fused_logprobs_entropy(hidden, weight[:, :8], targets)
