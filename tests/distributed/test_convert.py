"""HF <-> Megatron conversion, scoring and export against Hugging Face transformers (fp32, CPU).

Tiny random models (GQA 8 heads / 2 KV groups, vocab 300 padded to 384 at TP=1 and 512 at TP=2):
Llama 3 untied with llama3 RoPE scaling, Qwen2 tied with QKV bias, Qwen3 untied with QK norm.
Each checkpoint is written once (TP=1) and loaded at TP=1, TP=2 and PP=2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import launch, torchrun
from tests.unit.models import tiny_configs

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).parent / "workers"
MODELS = {"llama": False, "qwen2": True, "qwen3": False}  # name -> tied embeddings
SEQS = [[5, 17, 299, 3, 42], [7] + list(range(100, 111)), [1, 250, 2, 2, 9, 8, 7, 6, 120]]
pytestmark = pytest.mark.distributed


def _convert(*args: str) -> None:
    cmd = [sys.executable, str(ROOT / "tools" / "convert.py"), *args, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _make_hf(name: str, folder: Path, **overrides: object) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**tiny_configs.ALL[name](MODELS[name]), **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)  # large enough that a wrong layout shows in the logits
    model.save_pretrained(folder, max_shard_size="100KB")  # sharded, with an index
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("convert")
    seqs_file = root / "in.jsonl"
    seqs_file.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SEQS))
    out = {"input": seqs_file}
    for name in MODELS:
        hf_dir, mg_dir = root / f"{name}-hf", root / f"{name}-mg"
        model = _make_hf(name, hf_dir)
        _convert("hf-to-megatron", "--hf", str(hf_dir), "--out", str(mg_dir))
        with torch.no_grad():
            ref = [
                torch.log_softmax(model(torch.tensor([s])).logits[0, :-1].float(), -1).gather(
                    -1, torch.tensor(s[1:])[:, None]
                )[:, 0]
                for s in SEQS
            ]
        out[name] = {"hf": hf_dir, "mg": mg_dir, "ref": ref, "model": model}
    return out


def _check_logprobs(converted: dict, got: dict[str, list]) -> None:
    for name in MODELS:
        for ref, mine in zip(converted[name]["ref"], got[str(converted[name]["mg"])]):
            err = (torch.tensor(mine) - ref).abs().max().item()
            assert err < 1e-4, (name, err)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_checkpoint_loads_and_scores_like_hf(converted, tp, pp):
    ckpts = [str(converted[name]["mg"]) for name in MODELS]
    args = ["--tp", str(tp), "--pp", str(pp), "--input", str(converted["input"]), *ckpts]
    out = launch(WORKERS / "score_layouts.py", *args, nproc=2)
    _check_logprobs(converted, json.loads(out.strip().splitlines()[-1]))


def test_in_trainer_teacher_scores_like_hf_at_tp2(converted):
    """The distillation teacher built from the HF folders at TP=2 (``algorithm.teacher.hf_path``)
    gives HF's log-probs to every response token (the SGLang teacher's are tested equal to HF's
    in tests/sglang, so the two teachers agree)."""
    folders = [str(converted[name]["hf"]) for name in MODELS]
    out = launch(WORKERS / "teacher_scores.py", "--tp", "2", "--input", str(converted["input"]),
                 *folders)  # fmt: skip
    got = json.loads(out.strip().splitlines()[-1])
    for name in MODELS:
        rows = got[str(converted[name]["hf"])]
        assert [len(r) for r in rows] == [len(s) - 1 for s in SEQS]
        for ref, mine in zip(converted[name]["ref"], rows):
            err = (torch.tensor(mine) - ref).abs().max().item()
            assert err < 1e-4, (name, err)


def test_checkpoint_loads_and_scores_like_hf_tp1(converted):
    ckpts = [str(converted[name]["mg"]) for name in MODELS]
    cmd = [sys.executable, str(WORKERS / "score_layouts.py"), "--input", str(converted["input"])]
    proc = subprocess.run([*cmd, *ckpts], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_logprobs(converted, json.loads(proc.stdout.strip().splitlines()[-1]))


def test_score_command_under_torchrun_tp2(converted, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["--load", str(converted["qwen2"]["mg"]), "--tp", "2", "--input"]
    torchrun("-m", "hpt_megatron.score", *args, str(converted["input"]), "--output", str(out))
    rows = [json.loads(line)["logprobs"] for line in out.read_text().splitlines()]
    assert [len(r) for r in rows] == [len(s) - 1 for s in SEQS]
    for ref, mine in zip(converted["qwen2"]["ref"], rows):
        assert (torch.tensor(mine) - ref).abs().max().item() < 1e-4


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_megatron_hf_is_bit_exact(converted, tmp_path, name):
    back = tmp_path / "back"
    _convert("megatron-to-hf", "--load", str(converted[name]["mg"]), "--out", str(back))
    original, returned = _hf_tensors(converted[name]["hf"]), _hf_tensors(back)
    if MODELS[name]:
        original.pop("lm_head.weight", None)
    assert sorted(returned) == sorted(original)
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert (back / "tokenizer_config.json").is_file() and (back / "config.json").is_file()


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_layout_export_and_sharded_checkpoint_are_bit_exact(converted, tmp_path, tp, pp):
    """The run's HF export at TP=2 / PP=2, and the converter reading a checkpoint that Megatron
    itself wrote at that layout (QKV, fc1 and vocabulary split into TP chunks, vocabulary padded
    to 512), both give back every original tensor."""
    original = _hf_tensors(converted["llama"]["hf"])
    exported, resaved, back = tmp_path / "export", tmp_path / "resaved", tmp_path / "back"
    args = ["--load", str(converted["llama"]["mg"]), "--hf-out", str(exported)]
    launch(
        WORKERS / "export_layouts.py",
        *args,
        "--megatron-out",
        str(resaved),
        "--tp",
        str(tp),
        "--pp",
        str(pp),
    )
    (resaved / "config.json").write_text((converted["llama"]["mg"] / "config.json").read_text())
    _convert("megatron-to-hf", "--load", str(resaved), "--out", str(back))
    for folder in (exported, back):
        returned = _hf_tensors(folder)
        assert sorted(returned) == sorted(original), folder
        assert all(torch.equal(returned[k], original[k]) for k in original), folder
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(original)


def test_virtual_pipeline_scores_and_exports_like_hf(tmp_path):
    """Four layers at PP=2 x VPP=2 (each rank holds two one-layer chunks, layers 0 and 2 on the
    first stage): the converted checkpoint scores like HF and exports back bit for bit."""
    hf_dir, mg_dir = tmp_path / "hf", tmp_path / "mg"
    model = _make_hf("llama", hf_dir, num_hidden_layers=4)
    _convert("hf-to-megatron", "--hf", str(hf_dir), "--out", str(mg_dir))
    seqs = tmp_path / "in.jsonl"
    seqs.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in SEQS))
    args = ["--pp", "2", "--vpp", "2", "--input", str(seqs), str(mg_dir)]
    got = json.loads(launch(WORKERS / "score_layouts.py", *args).strip().splitlines()[-1])
    with torch.no_grad():
        for seq, mine in zip(SEQS, got[str(mg_dir)]):
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
            assert (torch.tensor(mine) - ref).abs().max().item() < 1e-4
    exported = tmp_path / "export"
    launch(
        WORKERS / "export_layouts.py",
        "--load",
        str(mg_dir),
        "--hf-out",
        str(exported),
        "--megatron-out",
        str(tmp_path / "resaved"),
        "--pp",
        "2",
        "--vpp",
        "2",
    )
    original, returned = _hf_tensors(hf_dir), _hf_tensors(exported)
    assert sorted(returned) == sorted(original)
    assert all(torch.equal(returned[k], original[k]) for k in original)


def test_schema_on_a_gpu_machine_is_the_cpu_one(converted):
    script = WORKERS / "schema_on_gpu_machine.py"
    cmd = [sys.executable, str(script), str(converted["llama"]["hf"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_converter_writes_what_megatron_writes(converted, tmp_path):
    """The model-free writer's index equals the one Megatron's dist_checkpointing.save writes
    for the TP=PP=1 model: same keys, global shapes, dtypes and chunks."""
    from torch.distributed.checkpoint import FileSystemReader

    resaved = tmp_path / "resaved"
    launch(
        WORKERS / "export_layouts.py",
        "--load",
        str(converted["qwen2"]["mg"]),
        "--hf-out",
        str(tmp_path / "hf"),
        "--megatron-out",
        str(resaved),
        nproc=1,
    )
    ours = FileSystemReader(converted["qwen2"]["mg"]).read_metadata().state_dict_metadata
    theirs = FileSystemReader(resaved).read_metadata().state_dict_metadata
    assert sorted(ours) == sorted(theirs)
    for key, md in theirs.items():
        if hasattr(md, "size"):
            mine = ours[key]
            assert (mine.size, mine.properties.dtype) == (md.size, md.properties.dtype), key
            assert sorted(map(str, mine.chunks)) == sorted(map(str, md.chunks)), key


def test_hf_shape_unlike_the_config_is_a_clear_error_that_writes_nothing(converted, tmp_path):
    bad, out = tmp_path / "bad", tmp_path / "out"
    shutil.copytree(converted["llama"]["hf"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "convert.py"),
        "hf-to-megatron",
        "--hf",
        str(bad),
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "linear_fc1.weight: HF shapes [[96, 64], [96, 64]] make [192, 64], not [256, 64]" in (
        proc.stderr
    )
    assert not out.exists()


_FAIL_FIFTH_CHUNK = """
import sys
from hpt_megatron import convert
from hpt_megatron.models import torch_dist
real, done = torch_dist._piece_tensor, []
def failing(reader, piece, *args):
    tensor = real(reader, piece, *args)
    if not tensor.is_meta:
        done.append(piece)
        if len(done) == 5:
            raise ValueError("no space left on device (simulated)")
    return tensor
torch_dist._piece_tensor = failing
sys.exit(convert.main(sys.argv[1:]))
"""


def test_failure_while_writing_is_reported_and_leaves_no_partial_checkpoint(converted, tmp_path):
    out = tmp_path / "out"
    args = ["hf-to-megatron", "--hf", str(converted["qwen2"]["hf"]), "--out", str(out)]
    cmd = [sys.executable, "-c", _FAIL_FIFTH_CHUNK, *args, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: no space left on device (simulated)" in proc.stderr
    assert not out.exists()


def test_converter_refuses_torchrun_and_non_checkpoints(tmp_path, monkeypatch, capsys):
    from hpt_megatron import convert

    (tmp_path / "config.json").write_text(json.dumps(tiny_configs.llama()))
    argv = ["megatron-to-hf", "--load", str(tmp_path), "--out", str(tmp_path / "o")]
    assert convert.main(argv) == 2
    assert "not a Megatron distributed checkpoint (no metadata.json)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert convert.main(argv) == 2
    assert "start it with python, not torchrun" in capsys.readouterr().err


def test_exported_folder_loads_and_generates(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    back = tmp_path / "back"
    _convert("megatron-to-hf", "--load", str(converted["qwen2"]["mg"]), "--out", str(back))
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    prompt = torch.tensor([SEQS[0]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    got = model.generate(prompt, **kwargs)
    want = converted["qwen2"]["model"].generate(prompt, **kwargs)
    assert got.shape == (1, len(SEQS[0]) + 6) and torch.equal(got, want)
