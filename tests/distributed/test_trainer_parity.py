"""Log-probs, loss and gradient norm are layout-invariant: TP=2, PP=2 (also with two virtual
stages per rank) and DP=2 equal TP=PP=DP=1,
and one step is split-invariant over micro-batching (1 x 4 versus 4 x 1)."""

import json
import pathlib

import pytest

from tests.distributed.launch import launch

WORKER = pathlib.Path(__file__).parent / "workers" / "train_parity.py"
pytestmark = pytest.mark.distributed


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        assert len(a[key]) == len(b[key])
        for x, y in zip(a[key], b[key]):
            worst = max(worst, abs(x - y) / max(abs(x), 1e-6))
    return worst


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt, out = tmp / "ckpt", tmp / "ref.json"
    launch(
        WORKER, "--arch", request.param, "--ckpt", str(ckpt), "--out", str(out), "--save", nproc=1
    )
    return request.param, ckpt, json.loads(out.read_text())


@pytest.mark.parametrize(
    "layout",
    [["--tp", "2"], ["--pp", "2"], ["--pp", "2", "--vpp", "2"], []],
    ids=["tp2", "pp2", "pp2-vpp2", "dp2"],
)
def test_layout_matches_single_process(reference, layout, tmp_path):
    arch, ckpt, ref = reference
    out = tmp_path / "got.json"
    launch(WORKER, "--arch", arch, "--ckpt", str(ckpt), "--out", str(out), *layout, nproc=2)
    got = json.loads(out.read_text())
    assert _max_rel(ref["before"], got["before"]) < 1e-5
    assert abs(ref["loss"] - got["loss"]) / ref["loss"] < 1e-5
    assert abs(ref["grad_norm"] - got["grad_norm"]) / ref["grad_norm"] < 1e-5
    # After one update the log-probs depend on every gradient entry, not just its norm.
    assert _max_rel(ref["after"], got["after"]) < 1e-5
    # The update really moved the model (the comparison above is not vacuous).
    assert _max_rel(ref["before"], ref["after"]) > 1e-3


def test_microbatch_split_invariance(reference, tmp_path):
    arch, ckpt, ref = reference
    out = tmp_path / "split.json"
    # A budget of 24 tokens forces one micro-batch per one or two samples.
    launch(
        WORKER,
        "--arch",
        arch,
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--max-tokens",
        "24",
        nproc=1,
    )
    got = json.loads(out.read_text())
    assert ref["num_microbatches"] == 1 and got["num_microbatches"] >= 4
    assert abs(ref["loss"] - got["loss"]) / ref["loss"] < 1e-6
    assert abs(ref["grad_norm"] - got["grad_norm"]) / ref["grad_norm"] < 1e-5
    assert _max_rel(ref["after"], got["after"]) < 1e-5


def test_a_start_from_hf_weights_matches_at_tp2(tmp_path):
    """Weights loaded without a random initialisation first keep their tensor-parallel marks: at
    TP=2 the gradient norm counts every shard (it once counted TP rank 0's only)."""
    folder = tmp_path / "hf"
    launch(WORKER, "--arch", "qwen2", "--write-hf", str(folder), "--ckpt", "-", "--out", "-")
    got = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.json"
        args = ["--arch", "qwen2", "--hf-weights", str(folder), "--ckpt", "-", "--out", str(out)]
        launch(WORKER, *args, "--tp", str(tp), nproc=tp)
        got[tp] = json.loads(out.read_text())
    assert abs(got[1]["loss"] - got[2]["loss"]) / got[1]["loss"] < 1e-5
    assert abs(got[1]["grad_norm"] - got[2]["grad_norm"]) / got[1]["grad_norm"] < 1e-5
    assert _max_rel(got[1]["after"], got[2]["after"]) < 1e-5
