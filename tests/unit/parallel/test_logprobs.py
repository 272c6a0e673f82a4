"""vocab_parallel_logprobs_entropy against a float64 log_softmax reference (one process, no TP).

Shape legend: B rows, T tokens per row, V vocabulary.
"""

import pytest
import torch

from hpt_megatron.parallel.logprobs import vocab_parallel_logprobs_entropy

B, T, V = 3, 7, 50  # N = 21 tokens


def reference(
    logits_btv: torch.Tensor, targets_bt: torch.Tensor, g_lp: torch.Tensor, g_h: torch.Tensor
):
    """float64 log-probs, entropy and d(g_lp . logprobs + g_h . entropy) / d logits."""
    x = logits_btv.detach().double().requires_grad_(True)
    logp = torch.log_softmax(x, dim=-1)
    logprobs = logp.gather(-1, targets_bt[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    ((logprobs * g_lp.double()).sum() + (entropy * g_h.double()).sum()).backward()
    return logprobs.detach(), entropy.detach(), x.grad


def make(dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen)
    g_lp = torch.randn(B, T, generator=gen)
    g_h = torch.randn(B, T, generator=gen)
    return logits, targets, g_lp, g_h


def run(logits, targets, g_lp, g_h, chunk):
    x = logits.clone().requires_grad_(True)
    logprobs, entropy = vocab_parallel_logprobs_entropy(x, targets, chunk_tokens=chunk)
    ((logprobs * g_lp).sum() + (entropy * g_h).sum()).backward()
    return logprobs, entropy, x.grad


@pytest.mark.parametrize("chunk", [1, 4, 7, B * T, 1000])
def test_fp32_values_and_gradients_match_float64_reference(chunk):
    logits, targets, g_lp, g_h = make()
    logprobs, entropy, grad = run(logits, targets, g_lp, g_h, chunk)
    ref_lp, ref_h, ref_grad = reference(logits, targets, g_lp, g_h)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == (B, T)
    assert grad.dtype == torch.float32 and grad.shape == logits.shape
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_chunk_size_does_not_change_the_result():
    logits, targets, g_lp, g_h = make(seed=1)
    outs = [run(logits, targets, g_lp, g_h, chunk) for chunk in (1, 5, 1024)]
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_large_logits_are_stable():
    # exp(logits) overflows fp32 without the max shift.
    logits, targets, g_lp, g_h = make(seed=2, scale=200.0)
    logprobs, entropy, grad = run(logits, targets, g_lp, g_h, 4)
    ref_lp, ref_h, ref_grad = reference(logits, targets, g_lp, g_h)
    assert torch.isfinite(logprobs).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(entropy.double(), ref_h, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_bf16_logits_give_fp32_outputs_and_a_bf16_gradient(chunk):
    logits, targets, g_lp, g_h = make(torch.bfloat16, seed=3)
    logprobs, entropy, grad = run(logits, targets, g_lp, g_h, chunk)
    # The reference sees exactly the bf16 values, so only the fp32 maths and the final bf16
    # rounding of the gradient separate the two.
    ref_lp, ref_h, ref_grad = reference(logits, targets, g_lp, g_h)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1 / 128, atol=1e-4)


def test_logprob_only_loss_backpropagates():
    logits, targets, _, _ = make(seed=4)
    x = logits.clone().requires_grad_(True)
    logprobs, _ = vocab_parallel_logprobs_entropy(x, targets, chunk_tokens=5)
    logprobs.sum().backward()
    _, _, ref_grad = reference(logits, targets, torch.ones(B, T), torch.zeros(B, T))
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_logits_are_not_modified():
    logits, targets, g_lp, g_h = make(seed=5)
    x = logits.clone().requires_grad_(True)
    logprobs, entropy = vocab_parallel_logprobs_entropy(x, targets, chunk_tokens=3)
    ((logprobs * g_lp).sum() + (entropy * g_h).sum()).backward()
    assert torch.equal(x.detach(), logits)


def test_flat_input():
    logits, targets, g_lp, g_h = make(seed=6)
    flat = logits.reshape(B * T, V)
    logprobs, entropy, grad = run(flat, targets.reshape(-1), g_lp.reshape(-1), g_h.reshape(-1), 4)
    ref_lp, ref_h, ref_grad = reference(logits, targets, g_lp, g_h)
    assert logprobs.shape == (B * T,)
    torch.testing.assert_close(logprobs.double(), ref_lp.reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad.reshape(B * T, V), rtol=1e-5, atol=1e-6)


def test_shape_mismatch_is_a_clear_error():
    logits, targets, _, _ = make()
    with pytest.raises(ValueError, match=r"logits \(3, 7, 50\) and targets \(3, 6\) disagree"):
        vocab_parallel_logprobs_entropy(logits, targets[:, :-1])


def test_low_entropy_with_large_logits_keeps_fp32_precision():
    # A confident policy: one logit ~12 above the rest, all offset by 40. The entropy (~1e-3) and
    # the top log-prob (~-1e-4) are tiny next to the logits, so they must not be formed as the
    # difference of two numbers of size 40.
    logits, _, _, _ = make(seed=7, scale=1.0)
    logits = logits + 40.0
    top = logits.argmax(-1)
    logits.scatter_add_(-1, top[..., None], torch.full((B, T, 1), 12.0))
    logprobs, entropy = vocab_parallel_logprobs_entropy(logits, top, chunk_tokens=4)
    ref_lp, ref_h, _ = reference(logits, top, torch.zeros(B, T), torch.zeros(B, T))
    assert ref_h.max() < 1e-2 and ref_lp.min() > -1e-3
    # Summing exp(s) next to the dominant 1 in fp32 bounds both to ~1e-7 absolute error; the
    # unshifted form (log Z - mean logit, target logit - log Z) errs by ~|logit| * eps = 1e-5.
    torch.testing.assert_close(entropy.double(), ref_h, rtol=0.0, atol=1e-6)
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_padding_columns_get_no_probability(dtype):
    # Megatron pads the vocabulary (here 50 -> 64); whatever the padded logits hold, the result
    # is that of the true 50 columns and the padding gets a zero gradient.
    logits, targets, g_lp, g_h = make(dtype, seed=8)
    padded = torch.cat([logits, torch.full((B, T, 14), 30.0, dtype=dtype)], dim=-1)
    x = padded.clone().requires_grad_(True)
    logprobs, entropy = vocab_parallel_logprobs_entropy(x, targets, chunk_tokens=4, vocab_size=V)
    ((logprobs * g_lp).sum() + (entropy * g_h).sum()).backward()
    ref_lp, ref_h, ref_grad = reference(logits, targets, g_lp, g_h)
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_h, rtol=1e-5, atol=1e-5)
    tol = (
        {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1 / 128, "atol": 1e-4}
    )
    torch.testing.assert_close(x.grad[..., :V].double(), ref_grad, **tol)
    assert torch.equal(x.grad[..., V:], torch.zeros_like(x.grad[..., V:]))
