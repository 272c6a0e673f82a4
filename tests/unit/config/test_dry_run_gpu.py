"""``hpt train CONFIG --dry-run --target gpu``: a GPU config checked from this CPU machine, every
problem listed in one run; the checks of the run's shape (SGLang against the model, servers
against the node's GPUs, writable folders, disk, batch) and the summary with its memory
estimate, checked against a hand computation."""

import json
import os
import pathlib
from dataclasses import replace

import pytest

from hpt_megatron.cli import main
from hpt_megatron.config import load_config
from hpt_megatron.models.hf_config import parameter_count
from hpt_megatron.models.provider import load_hf_config
from hpt_megatron.orchestration import layout_checks
from hpt_megatron.orchestration.estimate import (
    GIB,
    checkpoint_bytes,
    estimate_memory,
    gpu_memory_gib,
)

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "examples"
PAPER_15B = str(EXAMPLES / "qwen2.5-math-1.5b-hpt.yaml")
# Qwen2.5-Math-1.5B's config.json (the fields read).
QWEN_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(autouse=True)
def _no_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def paper(tmp_path, monkeypatch) -> list[str]:
    """Overrides that point the 1.5B example at a config.json and a data file in ``tmp_path``
    (on a disk with 1 TiB free: its checkpoints take 20 GiB each)."""
    monkeypatch.setattr(layout_checks, "free_bytes", lambda path: 1024 * GIB)
    model = tmp_path / "qwen"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN_15B))
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=?", "answer": "2", "target": "2"}\n')
    return [
        *(f"model.{k}={model}" for k in ("hf_config", "hf_weights", "tokenizer")),
        f"data.train={data}",
        "data.val=null",
        f"run.output_dir={tmp_path / 'run'}",
    ]


def _dry_run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["train", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _problems(err: str) -> list[str]:
    prefix = "hpt train: config error: "
    lines = err.strip().splitlines()
    assert all(line.startswith(prefix) for line in lines), err
    return [line[len(prefix) :].split(":")[0] for line in lines]


def test_a_gpu_config_fails_here_with_every_gpu_setting_at_once(capsys, paper):
    code, out, err = _dry_run(capsys, PAPER_15B, "--dry-run", "--world-size", "8", *paper)
    assert code == 2 and out == ""
    keys = _problems(err)
    for key in ("parallel.backend", "rollout.sglang.device"):
        assert key in keys, err
    # bf16 with fp32 main weights, recomputation and the distributed optimizer train on the CPU
    # too (tests/distributed/test_paper_path.py): not problems here.
    for key in (
        "model.params_dtype",
        "model.recompute_granularity",
        "trainer.use_distributed_optimizer",
    ):
        assert key not in keys, err


def test_a_gpu_config_passes_for_a_gpu_node_with_a_summary(capsys, paper):
    args = [PAPER_15B, "--dry-run", "--world-size", "8", "--target", "gpu", *paper]
    code, out, err = _dry_run(capsys, *args, "--gpus-per-node", "8", "--gpu", "h200")
    assert code == 0, err
    assert out.startswith("run:")  # the resolved config, alone on stdout
    lines = err.strip().splitlines()
    assert lines[-1] == "dry run: OK"
    assert lines[0].startswith(
        "dry run for a GPU node (--target gpu): world size 8 = data parallel"
    )
    assert "rollouts per step: 128 prompts x 8 = 1024" in err
    assert "8 SGLang server(s) per node, colocated, on GPUs 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 (a" in err
    assert "model: qwen2, 1.54 B parameters" in err
    assert "memory per GPU (estimate): weights 2.9 GiB" in err and "of 141 GiB" in err
    assert "WARNING" not in err
    code, _, err = _dry_run(capsys, *args, "--gpu", "a100-40gb")
    assert code == 0 and "WARNING: the estimated" in err and "exceeds the device's 40 GiB" in err


def test_every_problem_of_the_run_shape_is_listed_in_one_run(capsys, paper, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, out, err = _dry_run(
        capsys,
        PAPER_15B,
        "--dry-run",
        "--world-size=8",
        "--target=gpu",
        "--gpus-per-node=8",
        *paper,
        "model.max_position_embeddings=null",  # the stock config's 4096 positions
        "rollout.sglang.context_length=null",
        "rollout.sglang.tp_size=5",  # 12 heads
        "rollout.sglang.servers_per_node=2",  # 2 x 5 GPUs on a node of 8
        f"rollout.sglang.log_dir={blocker / 'logs'}",
        "trainer.mini_batches_per_step=256",  # 128 prompts
    )
    assert code == 2 and out == ""
    assert _problems(err) == [
        "rollout.sglang.log_dir",
        "trainer.mini_batches_per_step",
        "rollout.max_new_tokens",
        "rollout.sglang.tp_size",
        "rollout.sglang.servers_per_node",
    ]
    assert "= 9216 exceeds SGLang's context length 4096" in err
    assert "need GPUs up to id 9; a node has 8" in err
    longer = [*paper, "model.max_position_embeddings=null", "rollout.sglang.context_length=16384"]
    gpu_node = [PAPER_15B, "--dry-run", "--world-size=8", "--target=gpu"]
    code, _, err = _dry_run(capsys, *gpu_node, *longer)
    assert code == 2 and _problems(err) == ["rollout.sglang.context_length"]
    assert "16384 exceeds the model's max_position_embeddings 4096" in err
    allowed = "rollout.sglang.env={SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN: '1'}"
    assert _dry_run(capsys, *gpu_node, *longer, allowed)[0] == 0


def test_an_unwritable_output_dir_and_a_full_disk(capsys, tmp_path, monkeypatch):
    tiny = [str(EXAMPLES / "tiny_cpu.yaml"), "--dry-run", "--world-size", "2"]
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = _dry_run(capsys, *tiny, f"run.output_dir={locked / 'run'}")
    if code == 0:  # root writes anywhere
        assert os.geteuid() == 0
    else:
        assert _problems(err) == ["run.output_dir"] and "cannot be written" in err
    monkeypatch.setattr(layout_checks, "free_bytes", lambda path: 1024)
    code, _, err = _dry_run(capsys, *tiny, f"run.output_dir={tmp_path / 'run'}")
    assert code == 2 and "run.output_dir: " in err and "less than one checkpoint" in err


def test_gpu_memory_by_name():
    assert gpu_memory_gib("h100") == 80 and gpu_memory_gib("NVIDIA H100 80GB HBM3") == 80
    assert gpu_memory_gib("NVIDIA A100-SXM4-40GB") == 40 and gpu_memory_gib("a100") == 80
    assert gpu_memory_gib("24") == 24 and gpu_memory_gib("tpu") is None
    assert main(["train", str(EXAMPLES / "tiny_cpu.yaml"), "--dry-run", "--gpu", "tpu"]) == 2


def test_the_memory_estimate_by_hand(tmp_path):
    """A small model worked out by hand: H=64, I=128, L=4, heads 4 (kv 2, hd 16), V=1000
    (padded to 1024 at tp 2), untied; tp 2, pp 1, dp 4; bf16, distributed optimizer; T=1024."""
    hf = load_hf_config(
        {
            **{k: QWEN_15B[k] for k in ("architectures", "model_type", "rms_norm_eps")},
            "vocab_size": 1000,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rope_theta": 1e4,
            "tie_word_embeddings": False,
        }
    )
    # Per layer: q 64*64 + k,v 2*64*32 + o 64*64 = 12288, biases (qwen2) 64+32+32 = 128,
    # norms 128, MLP 3*64*128 = 24576: 37120; 4 layers 148480; + 2*1024*64 + 64 = 279616.
    assert parameter_count(hf, vocab=1024) == 279616
    assert parameter_count(hf) == 148480 + 2 * 1000 * 64 + 64
    assert checkpoint_bytes(1000, "bf16") == 14000 and checkpoint_bytes(1000, "fp32") == 12000
    overrides = [
        "parallel.tp=2",
        "model.params_dtype=bf16",
        "trainer.use_distributed_optimizer=true",
        "trainer.max_tokens_per_microbatch=1024",
        "model.make_vocab_size_divisible_by=512",
    ]
    cfg = load_config(EXAMPLES / "tiny_cpu.yaml", overrides)
    mem = estimate_memory(cfg, hf, dp=4, device_bytes=None)
    shard = 279616 / 2
    assert mem.weights == int(shard * 2) and mem.grads == int(shard * 4)
    assert mem.optimizer == int(shard * 12 / 4)
    # 4 layers x 1024 tokens x 64 x (10 + 24/2) bytes, + logits 1024 x 1024/2 x 2 bytes.
    assert mem.activations == 4 * 1024 * 64 * 22 + 1024 * 512 * 2
    assert mem.sglang == 0 and mem.peak == mem.weights + mem.grads + mem.optimizer + mem.activations
    full = estimate_memory(
        replace(cfg, model=replace(cfg.model, recompute_granularity="full")), hf, 4, None
    )
    assert full.activations == 4 * 1024 * 64 * 2 + 1024 * 64 * 22 + 1024 * 512 * 2
    # SGLang colocated on the GPU: half of an 80 GiB card, held unless the memory saver frees it.
    sglang = [
        "rollout.engine=sglang",
        "rollout.sglang.mem_fraction_static=0.5",
        "rollout.sglang.device=cuda",
    ]
    served = load_config(EXAMPLES / "tiny_cpu.yaml", [*overrides, *sglang])
    mem = estimate_memory(served, hf, dp=4, device_bytes=80 * GIB)
    assert mem.sglang == 40 * GIB and not mem.sglang_released
    assert mem.peak == mem.trainer_state + mem.activations + 40 * GIB
    saver = load_config(
        EXAMPLES / "tiny_cpu.yaml",
        [*overrides, *sglang, "rollout.sglang.extra_args=[--enable-memory-saver]"],
    )
    mem = estimate_memory(saver, hf, dp=4, device_bytes=80 * GIB)
    assert mem.sglang_released and mem.peak == mem.trainer_state + 40 * GIB


def test_this_machine_with_gpus_counts_them_and_reads_the_first_ones_memory(monkeypatch):
    from types import SimpleNamespace

    from hpt_megatron.orchestration import preflight

    cuda = preflight.torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 8)
    props = SimpleNamespace(total_memory=80 * GIB)
    monkeypatch.setattr(cuda, "get_device_properties", lambda index: props)
    assert preflight.Target.this_machine() == preflight.Target(True, True, 8, 80.0)
    assert preflight.Target.this_machine(4, 141.0) == preflight.Target(True, True, 4, 141.0)
    assert preflight.Target.gpu_node() == preflight.Target(True, False, None, None)


def test_config_errors_of_every_section_at_once(capsys):
    overrides = [
        "trainer.lrr=1",
        "rollout.n=0",
        "model.params_dtype=bf16x",
        "data.prompts_per_step=0",
    ]
    code, out, err = _dry_run(capsys, str(EXAMPLES / "tiny_cpu.yaml"), "--dry-run", *overrides)
    assert code == 2 and out == ""
    assert _problems(err) == [
        "model.params_dtype",
        "unknown key 'trainer.lrr'; did you mean 'trainer.lr'?",
        "data.prompts_per_step",
        "rollout.n",
    ]
