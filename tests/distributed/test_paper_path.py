"""The paper configs' training path on CPU (``workers/paper_path.py``): bf16 weights with
Megatron's mixed-precision optimizer (fp32 main weights and Adam state), the distributed
optimizer at DP=2 and TP=2 x DP=2 (policy and critic) with its sharded state saved and resumed
at DP=2 and DP=1 (and refused, saying why, at another TP), and activation recomputation
(``full`` uniform and block, ``selective``).
One launch of two ranks checks every variant against the plain fp32 run from the same start."""

import json
import math
import pathlib

import pytest

from tests.distributed.launch import launch

WORKER = pathlib.Path(__file__).parent / "workers" / "paper_path.py"
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper_path")
    ckpt, out = tmp / "ckpt", tmp / "dp2.json"
    launch(WORKER, "--ckpt", str(ckpt), "--out", str(out), nproc=2)
    return ckpt, json.loads(out.read_text())


def test_bf16_with_fp32_main_weights_follows_the_fp32_loss_curve(dp2):
    """bf16 keeps 8 significant bits (unit roundoff 2**-9, about 2e-3): each step the model's
    weights are the fp32 main weights rounded to bf16, and activations and gradients are bf16
    (matmuls accumulate in fp32), so a loss carries a relative error of a few roundoffs; the
    fp32 main weights and Adam state keep those errors from accumulating over the steps. 1e-2
    relative on each of the 20 losses is five roundoffs (the run gets about 3e-4), while the
    curve itself falls by about 40%, so a bf16 run that did not learn like the fp32 one fails."""
    _, got = dp2
    fp32, bf16 = got["fp32_losses"], got["bf16_losses"]
    assert len(fp32) == len(bf16) == 20
    for step, (want, have) in enumerate(zip(fp32, bf16), 1):
        assert abs(have - want) / want < 1e-2, (step, want, have)
    assert fp32[-1] < 0.7 * fp32[0]
    assert all(b < a for a, b in zip(bf16, bf16[1:]))
    precision = got["bf16_precision"]
    assert precision["classes"] == ["Float16OptimizerWithFloat16Params"]
    assert "torch.bfloat16" in precision["model_dtypes"]  # the norms' weights stay fp32
    assert precision["main_dtypes"] == precision["adam_dtypes"] == ["torch.float32"]


def test_distributed_optimizer_matches_the_plain_one_at_dp2(dp2):
    _, got = dp2
    assert got["moved"] > 1e-3  # five updates really moved the weights
    assert got["dist_opt_fp32"]["classes"] == ["DistributedOptimizer"]
    assert got["dist_opt_fp32"]["weight_diff"] < 1e-6
    assert got["dist_opt_fp32"]["loss_diff"] < 1e-6
    # bf16: both keep fp32 main weights equal to ~1e-7; rounding them to bf16 can differ by one
    # unit in the last place where a weight sits on a rounding boundary.
    bf16 = got["dist_opt_bf16"]
    assert bf16["precision"]["classes"] == ["DistributedOptimizer"]
    assert bf16["precision"]["main_dtypes"] == ["torch.float32"]
    ulp = 2.0 ** (math.floor(math.log2(bf16["max_abs_weight"])) - 7)
    assert bf16["weight_diff"] <= ulp
    assert got["critic_weight_diff"] < 1e-6


def test_recomputation_changes_neither_loss_nor_gradients(dp2):
    _, got = dp2
    for name in ("full_uniform", "full_block", "selective"):
        assert got[f"recompute_{name}"]["loss_diff"] < 1e-6, name
        assert got[f"recompute_{name}"]["grad_diff"] < 1e-6, name


def test_sharded_optimizer_state_resumes_at_dp2_dp1_and_dp4(dp2, tmp_path):
    """Saved after step 3 at DP=2 (``dp_reshardable``); a fresh engine that loads it trains
    steps 4-6 as the uninterrupted run did, at DP=2, and in new processes at DP=1 and DP=4 (each
    rank's optimizer shard re-cut from the saved ones)."""
    ckpt, got = dp2
    want = got["uninterrupted"]
    assert got["resumed_dp2"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert got["resumed_weight_diff"] < 1e-6
    for dp in (1, 4):
        out = tmp_path / f"dp{dp}.json"
        launch(WORKER, "--phase", "resume", "--ckpt", str(ckpt), "--out", str(out), nproc=dp)
        resumed = json.loads(out.read_text())
        assert resumed["dp"] == dp
        assert resumed["resumed"] == pytest.approx(want, rel=1e-6, abs=1e-9), dp


def test_sharded_optimizer_state_at_another_tp_is_refused_clearly(dp2, tmp_path):
    ckpt, _ = dp2
    out = tmp_path / "tp2.json"
    with pytest.raises(RuntimeError) as err:
        launch(WORKER, "--phase", "resume", "--tp", "2", "--ckpt", str(ckpt), "--out", str(out))
    assert "its distributed-optimizer state does not fit this layout" in str(err.value)
    assert "at the tensor/pipeline-parallel sizes it was saved with" in str(err.value)


def test_distributed_optimizer_at_tp2_dp2_matches_and_resumes(tmp_path):
    out = tmp_path / "tp2dp2.json"
    args = ["--tp", "2", "--only", "dist_opt", "--ckpt", str(tmp_path / "ckpt")]
    launch(WORKER, *args, "--out", str(out), nproc=4)
    got = json.loads(out.read_text())
    assert got["moved"] > 1e-3
    assert got["dist_opt_fp32"]["weight_diff"] < 1e-6
    assert got["resumed_dp2"] == pytest.approx(got["uninterrupted"], rel=1e-6, abs=1e-9)
