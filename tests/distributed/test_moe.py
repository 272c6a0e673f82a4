"""Qwen3-MoE (mixture of experts) against Hugging Face transformers: conversion, scoring at
EP=1/EP=2/TP=2/PP=2, export under expert parallelism (fp32, CPU, gloo).

The tiny model: 8 experts, top-2 with renormalised probabilities, four layers of which the second
is dense (``mlp_only_layers``), GQA 8 heads / 2 KV groups, QK norm, vocab 300 padded to 384/512.
One checkpoint is converted (TP=1) and loaded at every layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.distributed.launch import launch, torchrun
from tests.unit.models import tiny_configs

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).parent / "workers"
SEQS = [[5, 17, 299, 3, 42], [7] + list(range(100, 111)), [1, 250, 2, 2, 9, 8, 7, 6, 120]]
pytestmark = pytest.mark.distributed


def _convert(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "convert.py"), *args, "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _reference(model: torch.nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            torch.log_softmax(model(torch.tensor([s])).logits[0, :-1].float(), -1).gather(
                -1, torch.tensor(s[1:])[:, None]
            )[:, 0]
            for s in SEQS
        ]


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe")
    hf_dir, mg_dir = root / "hf", root / "mg"
    torch.manual_seed(0)
    config = AutoConfig.for_model(**tiny_configs.qwen3_moe())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)  # large enough that a wrong expert shows in the logits
    model.save_pretrained(hf_dir, max_shard_size="100KB")  # per-expert tensors, sharded
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    proc = _convert("hf-to-megatron", "--hf", str(hf_dir), "--out", str(mg_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    seqs = root / "in.jsonl"
    seqs.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SEQS))
    return {"hf": hf_dir, "mg": mg_dir, "model": model.eval(), "ref": _reference(model), "in": seqs}


def _check(moe: dict, rows: list) -> None:
    assert len(rows) == len(SEQS)
    for ref, mine in zip(moe["ref"], rows):
        assert (torch.tensor(mine) - ref).abs().max().item() < 1e-4


def test_saved_layout_is_per_expert(moe):
    names = set(_hf_tensors(moe["hf"]))
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" in names  # the dense layer
    assert not any("gate_up_proj" in n for n in names)


def test_scores_like_hf_at_ep1(moe):
    cmd = [sys.executable, str(WORKERS / "score_layouts.py"), "--input", str(moe["in"])]
    proc = subprocess.run([*cmd, str(moe["mg"])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check(moe, json.loads(proc.stdout.strip().splitlines()[-1])[str(moe["mg"])])


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [["--tp", "2"], ["--pp", "2"], ["--etp", "2"], ["--tp", "2", "--etp", "1"]],
    ids=["tp2", "pp2", "etp2", "tp2-etp1"],
)
def test_scores_like_hf_at_tp2_pp2(moe, layout):
    out = launch(WORKERS / "score_layouts.py", *layout, "--input", str(moe["in"]), str(moe["mg"]))
    _check(moe, json.loads(out.strip().splitlines()[-1])[str(moe["mg"])])


def test_score_command_at_ep2(moe, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["--load", str(moe["mg"]), "--ep", "2", "--input", str(moe["in"]), "--output", str(out)]
    torchrun("-m", "hpt_megatron.score", *args)
    _check(moe, [json.loads(line)["logprobs"] for line in out.read_text().splitlines()])


def test_hf_megatron_hf_is_bit_exact(moe, tmp_path):
    back = tmp_path / "back"
    proc = _convert("megatron-to-hf", "--load", str(moe["mg"]), "--out", str(back))
    assert proc.returncode == 0, proc.stderr[-4000:]
    original, returned = _hf_tensors(moe["hf"]), _hf_tensors(back)
    assert sorted(returned) == sorted(original)
    assert all(torch.equal(returned[k], original[k]) for k in original)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--ep", "2"], ["--tp", "2"]], ids=["ep2", "tp2"])
def test_export_and_megatron_checkpoint_at_a_layout_are_bit_exact(moe, tmp_path, layout):
    """The run's HF export at EP=2 (each expert-parallel rank writes its own experts) or TP=2
    (experts split over the expert TP group, gathered), and the converter reading a checkpoint
    Megatron itself wrote at that layout, give back every tensor."""
    exported, resaved, back = tmp_path / "export", tmp_path / "resaved", tmp_path / "back"
    args = ["--load", str(moe["mg"]), "--hf-out", str(exported), "--megatron-out", str(resaved)]
    launch(WORKERS / "export_layouts.py", *args, *layout)
    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    files = {index[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] for e in range(8)}
    assert len(files) == (2 if "--ep" in layout else 1)  # EP: experts 0-3, 4-7 by their ranks
    shutil.copy(moe["mg"] / "config.json", resaved / "config.json")
    proc = _convert("megatron-to-hf", "--load", str(resaved), "--out", str(back))
    assert proc.returncode == 0, proc.stderr[-4000:]
    original = _hf_tensors(moe["hf"])
    for folder in (exported, back):
        returned = _hf_tensors(folder)
        assert sorted(returned) == sorted(original), folder
        assert all(torch.equal(returned[k], original[k]) for k in original), folder


def test_exported_folder_loads_and_generates(moe, tmp_path):
    from transformers import AutoModelForCausalLM

    back = tmp_path / "back"
    assert _convert("megatron-to-hf", "--load", str(moe["mg"]), "--out", str(back)).returncode == 0
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    prompt = torch.tensor([SEQS[0]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    got = model.generate(prompt, **kwargs)
    assert got.shape == (1, len(SEQS[0]) + 6)
    assert torch.equal(got, moe["model"].generate(prompt, **kwargs))


def test_fused_expert_folder_converts_to_the_same_checkpoint(moe, tmp_path):
    """transformers 5's in-memory form (``experts.gate_up_proj`` / ``experts.down_proj``) saved
    as is reads as the per-expert tensors."""
    fused, mg, back = tmp_path / "fused", tmp_path / "mg", tmp_path / "back"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in moe["model"].state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, fused / "model.safetensors")
    shutil.copy(moe["hf"] / "config.json", fused / "config.json")
    assert _convert("hf-to-megatron", "--hf", str(fused), "--out", str(mg)).returncode == 0
    assert _convert("megatron-to-hf", "--load", str(mg), "--out", str(back)).returncode == 0
    original, returned = _hf_tensors(moe["hf"]), _hf_tensors(back)
    assert sorted(returned) == sorted(original)
    assert all(torch.equal(returned[k], original[k]) for k in original)


def test_checkpoint_experts_unlike_the_config_are_a_clear_error(moe, tmp_path):
    bad, out = tmp_path / "bad", tmp_path / "out"
    shutil.copytree(moe["hf"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_local_experts"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    proc = _convert("hf-to-megatron", "--hf", str(bad), "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.layers.0.mlp.experts holds 8 experts, config.json has 4" in proc.stderr
    assert not out.exists()


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(x - y) / max(abs(x), 1e-6) for k in a for x, y in zip(a[k], b[k], strict=True))


@pytest.mark.slow
def test_training_step_at_ep2_equals_ep1(tmp_path):
    """One NLL step of the MoE model (Megatron DDP + optimizer, expert grads reduced over the
    expert-data-parallel group): EP=2 on two ranks equals one process."""
    worker, ckpt = WORKERS / "train_parity.py", tmp_path / "ckpt"
    ref_out, got_out = tmp_path / "ref.json", tmp_path / "ep2.json"
    common = ["--arch", "qwen3_moe", "--ckpt", str(ckpt)]
    launch(worker, *common, "--out", str(ref_out), "--save", nproc=1)
    launch(worker, *common, "--out", str(got_out), "--ep", "2", nproc=2)
    ref, got = json.loads(ref_out.read_text()), json.loads(got_out.read_text())
    assert _max_rel(ref["before"], got["before"]) < 1e-5
    assert abs(ref["loss"] - got["loss"]) / ref["loss"] < 1e-5
    assert abs(ref["grad_norm"] - got["grad_norm"]) / ref["grad_norm"] < 1e-5
    assert _max_rel(ref["after"], got["after"]) < 1e-5
    assert _max_rel(ref["before"], ref["after"]) > 1e-3  # the update moved the model
