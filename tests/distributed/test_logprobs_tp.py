"""Vocab-parallel log-probs, entropy and logit gradients at TP=2 equal the unsplit computation;
so do the fused output layer's (hidden-state and weight gradients)."""

import json
import pathlib

import pytest

from tests.distributed.launch import launch

WORKER = pathlib.Path(__file__).parent / "workers" / "logprobs_tp.py"
pytestmark = pytest.mark.distributed


def _result(*args: str) -> dict:
    out = launch(WORKER, *args, nproc=2)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("chunk", ["1", "5", "1000"])
def test_tp2_fp32_matches_unsplit(chunk):
    got = _result("--chunk", chunk)
    assert all(n > 0 for n in got["targets_per_rank"])
    assert got["grad_shape"] == [2, 9, 32] and got["grad_dtype"] == "torch.float32"
    assert got["logprobs"] < 1e-5 and got["entropy"] < 1e-5 and got["grad"] < 1e-5, got


def test_tp2_bf16_matches_unsplit():
    got = _result("--dtype", "bf16", "--chunk", "4")
    assert got["grad_dtype"] == "torch.bfloat16"
    # fp32 maths on both paths; the gradient is rounded to bf16 (8 bits of mantissa).
    assert got["logprobs"] < 1e-5 and got["entropy"] < 1e-5, got
    assert got["grad"] < 1 / 64, got


@pytest.mark.parametrize("true_vocab", ["50", "30"], ids=["last-shard-part-padding", "all-padding"])
def test_tp2_vocab_padding_matches_unpadded(true_vocab):
    # Vocabulary padded to 64: rank 1 holds 18 real columns and 14 of padding, or only padding.
    got = _result("--true-vocab", true_vocab, "--chunk", "4")
    assert got["pad_grad_zero"] is True
    assert got["logprobs"] < 1e-5 and got["entropy"] < 1e-5 and got["grad"] < 1e-5, got


@pytest.mark.parametrize(
    "extra",
    [["--chunk", "8"], ["--chunk", "1000"], ["--chunk", "8", "--true-vocab", "50"]],
    ids=["chunk8", "one-chunk", "padded"],
)
def test_tp2_fused_output_layer_matches_unsplit_unfused(extra):
    # The shards' sums are taken at their own max and rescaled to the global one (one matmul per
    # chunk): equal to the unfused, unsplit path at fp32 1e-6.
    got = _result("--fused", *extra)
    assert all(n > 0 for n in got["targets_per_rank"])
    for key in ("logprobs", "entropy", "grad_hidden", "grad_weight"):
        assert got[key] < 1e-6, got
    # and as close to exact (float64) maths as the unfused path, up to fp32 rounding
    for key in ("grad_hidden", "grad_weight"):
        assert got[f"exact_{key}"] < 2 * got[f"unfused_exact_{key}"] + 1e-7, got
