"""The critic is layout-invariant: its values, clipped value loss and gradient norm at TP=2 and
PP=2 equal TP=PP=1 (fp32, relative 1e-5), and its values equal a plain HF forward
(``LlamaForTokenClassification`` with one label) of the same weights."""

import json
import pathlib
import sys

import pytest
import torch

from tests.distributed.launch import launch

WORKERS = pathlib.Path(__file__).parent / "workers"
WORKER = WORKERS / "critic_parity.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    scale = max(abs(x) for v in a.values() for x in v)
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True)) / scale


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("critic")
    ckpt, out, hf = tmp / "ckpt", tmp / "ref.json", tmp / "hf"
    launch(WORKER, "--ckpt", str(ckpt), "--out", str(out), "--save", "--hf", str(hf), nproc=1)
    return ckpt, json.loads(out.read_text()), hf


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_critic_layout_matches_single_process(reference, layout, tmp_path):
    ckpt, ref, _ = reference
    out = tmp_path / "got.json"
    launch(WORKER, "--ckpt", str(ckpt), "--out", str(out), *layout, nproc=2)
    got = json.loads(out.read_text())
    assert _max_rel(ref["before"], got["before"]) < 1e-5
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert got["clip_frac"] == pytest.approx(ref["clip_frac"], abs=1e-6)
    assert _max_rel(ref["after"], got["after"]) < 1e-5
    assert _max_rel(ref["before"], ref["after"]) > 1e-3  # the update moved the values
    assert 0 < ref["clip_frac"] < 1  # the value clip was active on some tokens, not all


def test_critic_values_equal_a_plain_hf_forward(reference):
    """The exported folder loads as HF's token classifier, whose logits are the values."""
    from transformers import AutoModelForTokenClassification

    sys.path.insert(0, str(WORKERS))
    from train_parity import make_samples

    _, ref, hf_dir = reference
    model = AutoModelForTokenClassification.from_pretrained(hf_dir).eval()
    assert type(model).__name__ == "LlamaForTokenClassification" and model.num_labels == 1
    with torch.no_grad():
        for i, s in enumerate(make_samples()):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            values = model(ids).logits[0, :, 0]
            want = values[len(s.prompt_ids) - 1 : ids.shape[1] - 1]
            got = torch.tensor(ref["before"][str(i)])
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (i, got, want)
