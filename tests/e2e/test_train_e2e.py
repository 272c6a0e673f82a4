"""``hpt train`` end to end on CPU (gloo): TP=2 and DP=2 runs, TensorBoard contents, resume after
SIGKILL reproducing the uninterrupted run, and falling back from a damaged checkpoint."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import pytest

from hpt_megatron.data.sample import RolloutBatch
from tests.helpers import hpt_train
from tests.helpers.forked import run_cli
from tests.helpers.procs import kill_tree

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # whole `hpt train` runs

SMALL = [
    "run.val_every=3",
    "run.val_max_prompts=8",
    "data.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "data.max_response_tokens=32",
    "checkpoint.save_every=2",
    "logging.progress_bar=false",
    "reward.num_workers=1",
]
# Metrics that must be identical between an interrupted-and-resumed run and an uninterrupted one.
EXACT = ["reward/mean", "gate/sft_fraction", "loss", "grad_norm", "response/length_mean", "lr"]


def _command(out: pathlib.Path, nproc: int, steps: int, *extra: str) -> list[str]:
    return hpt_train.command(hpt_train.TINY, out, f"run.steps={steps}", *SMALL, *extra, nproc=nproc)


def _run(out: pathlib.Path, nproc: int, steps: int, *extra: str) -> subprocess.CompletedProcess:
    return hpt_train.run(hpt_train.TINY, out, f"run.steps={steps}", *SMALL, *extra, nproc=nproc)


def test_tp2_run_writes_metrics_checkpoints_and_hf_export(tmp_path):
    out = tmp_path / "tp2"
    # Under torchrun itself, as the README launches it (the other runs fork their ranks).
    # Validation by the official protocol (avg@2 sampled at 0.6 / 0.95, the mean over sources);
    # the other runs of this module validate greedily.
    official_val = [
        "run.val_n=2",
        "run.val_temperature=0.6",
        "run.val_top_p=0.95",
        "run.val_score=source_mean",
    ]
    args = ["run.steps=4", *SMALL, "parallel.tp=2", *official_val]
    hpt_train.run(hpt_train.TINY, out, *args, nproc=2, launcher="torchrun")
    metrics = hpt_train.metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert all(m["train/rows"] > 0 and m["grad_norm"] > 0 for m in metrics.values())
    assert "val/accuracy" in metrics[3]
    per_source = {k: v for k, v in metrics[3].items() if k.startswith("val/accuracy/")}
    assert per_source  # one benchmark (the arithmetic task's level): the mean is its avg@2
    assert metrics[3]["val/accuracy"] == sum(per_source.values()) / len(per_source)
    assert all(v * 16 == round(v * 16) for v in per_source.values())  # shares of 8 x 2
    assert (out / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    # keep_last=2 keeps the two newest: step 4 (the end) and step 3 (saved as a new best)
    assert ckpts == ["best", "step_000003", "step_000004"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.vocab_size == 128

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in [
        "reward/mean",
        "gate/sft_fraction",
        "entropy",
        "response/length_mean",
        "response/length_max",
        "response/clipped_share",
        "clip_frac",
        "kl_old",
        "grad_norm",
        "lr",
        "throughput/tokens_per_s",
        "time/generation_s",
        "time/grading_s",
        "time/logprob_s",
        "time/train_s",
        "time/weight_sync_s",
        "val/accuracy",
    ]:
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2, 3, 4]
    assert "reward/per_prompt_success" in acc.Tags()["histograms"]

    # hpt eval reads a run checkpoint directly (converted on the fly; config + tokenizer inside).
    bench = tmp_path / "arith.json"
    bench.write_text(
        json.dumps([{"prompt": "12+34=?", "answer": "46"}, {"prompt": "50+21=?", "answer": "71"}])
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpt_megatron.cli",
            "eval",
            "--megatron-checkpoint",
            str(out / "checkpoints" / "step_000004"),
            "--benchmarks",
            str(bench),
            "--template",
            "chat",
            "--system-prompt",
            "none",
            "--k",
            "1",
            "--max-new-tokens",
            "8",
            "--output-dir",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        env=hpt_train.env(),
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arith" in proc.stdout
    assert len((tmp_path / "eval" / "responses.jsonl").read_text().splitlines()) == 2

    # The converter reads the TP=2 training checkpoint (optimizer state beside the weights) into
    # the same tensors the run exported at its end.
    import torch
    from safetensors.torch import load_file

    from hpt_megatron import convert

    back = tmp_path / "from-checkpoint"
    step = out / "checkpoints" / "step_000004"
    assert (
        convert.main(["megatron-to-hf", "--load", str(step), "--out", str(back), "--no-progress"])
        == 0
    )
    exported, converted = {}, {}
    for folder, tensors in ((out / "hf", exported), (back, converted)):
        for shard in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(shard))
    assert sorted(converted) == sorted(exported)
    assert all(torch.equal(converted[k].to(exported[k].dtype), exported[k]) for k in exported)


def test_dp2_matches_single_process(tmp_path):
    """Same seed and data: two data-parallel ranks train exactly like one process, step by step
    (the same initial weights at TP=1, so the rollouts, the loss and the gradient agree)."""
    one, dp = tmp_path / "one", tmp_path / "dp"
    _run(one, 1, 3, "parallel.tp=1", "run.val_every=0")
    # One engine on the driver: data-parallel generation samples each rank's share apart.
    _run(dp, 2, 3, "parallel.tp=1", "run.val_every=0", "rollout.cpu.data_parallel=false")
    for step in (1, 2, 3):
        a, b = hpt_train.metrics(one)[step], hpt_train.metrics(dp)[step]
        assert a["reward/mean"] == b["reward/mean"]
        assert a["train/rows"] == b["train/rows"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_ppo_with_kl_in_the_reward_dp2_matches_single_process(tmp_path):
    """The critic's values and the reference's KL are gathered over data-parallel ranks for GAE
    over the whole step: two ranks give one process's numbers."""
    extra = ["parallel.tp=1", "run.val_every=0", "algorithm.preset=ppo"]
    extra += ["rollout.cpu.data_parallel=false"]  # the same rollouts at both world sizes
    extra += ["algorithm.options.overlong_buffer=16", "algorithm.critic.lr=1e-3"]
    extra += ["algorithm.options.kl_coef=0.05", "algorithm.options.kl_mode=reward"]
    one, dp = tmp_path / "one", tmp_path / "dp"
    _run(one, 1, 3, *extra)
    _run(dp, 2, 3, *extra)
    keys = ["loss", "grad_norm", "kl_ref_mean", "kl_ref_max", "critic/value_loss"]
    keys += ["critic/grad_norm", "critic/explained_variance", "critic/returns_mean"]
    ones, dps = hpt_train.metrics(one), hpt_train.metrics(dp)
    for step in (1, 2, 3):
        a, b = ones[step], dps[step]
        assert a["reward/mean"] == b["reward/mean"]
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (step, key)
    assert ones[3]["kl_ref_mean"] > 0 and ones[3]["critic/value_loss"] > 0


def _kill_after(
    out: pathlib.Path, steps: int, *extra: str, kill_at: int, command: list[str] | None = None
) -> None:
    """Start a run (the tiny config's, or ``command``) and SIGKILL every process of it once step
    ``kill_at`` is logged."""
    proc = subprocess.Popen(
        command or _command(out, 2, steps, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=hpt_train.env(),
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and kill_at in hpt_train.metrics(out):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        kill_tree(proc.pid)  # the launcher and its ranks (each in a session of its own)
        proc.wait()


def test_resume_after_sigkill_reproduces_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(full, 2, 6, "parallel.tp=2")
    # Killed once step 4 is logged: step 4's save waited for step 2's, so a checkpoint is there.
    _kill_after(killed, 6, "parallel.tp=2", kill_at=4)
    assert 6 not in hpt_train.metrics(killed)
    proc = _run(killed, 2, 6, "parallel.tp=2")
    assert "resumed from" in proc.stderr
    want, got = hpt_train.metrics(full), hpt_train.metrics(killed)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        for key in EXACT:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-9), (step, key)


def test_ppo_resume_after_sigkill_reproduces_the_critic(tmp_path):
    """PPO with its critic: the critic's weights, optimizer and schedule are in the checkpoint,
    so a killed-and-resumed run continues step for step. DAPO's overlong penalty gives the
    random policy's rollouts nonzero rewards, so the critic has something to learn."""
    extra = ["parallel.tp=2", "algorithm.preset=ppo", "algorithm.options.overlong_buffer=16"]
    extra += ["algorithm.critic.lr=1e-3", "run.val_every=0"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(full, 2, 6, *extra)
    _kill_after(killed, 6, *extra, kill_at=4)  # after step 2's save completed (see above)
    assert 6 not in hpt_train.metrics(killed)
    proc = _run(killed, 2, 6, *extra)
    assert "resumed from" in proc.stderr  # with the critic of that checkpoint
    want, got = hpt_train.metrics(full), hpt_train.metrics(killed)
    assert sorted(got) == list(range(1, 7))
    assert (killed / "checkpoints" / "critic" / "step_000006").is_dir()
    keys = ["critic/value_loss", "critic/grad_norm", "critic/explained_variance"]
    for step in range(1, 7):
        for key in [*(k for k in EXACT if k != "gate/sft_fraction"), *keys]:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert want[6]["critic/value_loss"] > 0 and want[6]["critic/grad_norm"] > 0
    # The critic of the last TP=2 checkpoint, converted, is the folder the run exported at its end.
    import torch
    from safetensors.torch import load_file

    converted = tmp_path / "critic_hf"
    critic_ckpt = killed / "checkpoints" / "critic" / "step_000006"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), "critic-to-hf"]
        + ["--load", str(critic_ckpt), "--out", str(converted)],
        capture_output=True,
        text=True,
        env=hpt_train.env(),
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = {k: v for f in converted.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {
        k: v for f in (killed / "hf_critic").glob("*.safetensors") for k, v in load_file(f).items()
    }
    assert sorted(a) == sorted(b) and "score.weight" in a and "score.bias" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_newest_checkpoint_falls_back_with_warning(tmp_path):
    out = tmp_path / "run"
    _run(out, 2, 4, "parallel.tp=2", "checkpoint.keep_last=3", "run.val_every=0")
    newest = out / "checkpoints" / "step_000004"
    shard = next(p for p in sorted(newest.rglob("*.distcp")))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle of a shard
    shard.write_bytes(bytes(data))
    proc = _run(out, 2, 5, "parallel.tp=2", "checkpoint.keep_last=3", "run.val_every=0")
    assert "step_000004 is unusable" in proc.stderr and "falling back" in proc.stderr
    assert "resumed from" in proc.stderr and "step_000002" in proc.stderr
    metrics = hpt_train.metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4, 5]


def test_one_step_off_with_recomputed_old_logprobs(tmp_path):
    """Disaggregated placement, generation one step ahead, GRPO with two mini-batches per step
    (so pi_old is recomputed by the trainer and the second update has a real ratio)."""
    out = tmp_path / "async"
    _run(
        out,
        2,
        4,
        "parallel.tp=2",
        "run.placement=disaggregated",
        "run.max_staleness=1",
        "algorithm.preset=grpo",
        "trainer.mini_batches_per_step=2",
        "run.val_every=0",
    )
    metrics = hpt_train.metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4]
    # Step 1's batch comes from the starting weights; each later one from one update behind.
    assert [metrics[s]["rollout/staleness_max"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    assert all(m["time/logprob_s"] > 0 for m in metrics.values())
    assert all("clip_frac" in m and "ratio_mean" in m for m in metrics.values())
    # Stale batches get decoupled PPO's truncated IS by default.
    assert all("tis_clip_frac" in m and "mismatch/k3_kl" in m for m in metrics.values())


def test_fresh_run_starts_from_hf_weights_or_checkpoint(tmp_path):
    """``model.hf_weights`` / ``model.load`` initialise the policy: a run started from another
    run's HF export or checkpoint with a negligible learning rate exports (nearly) the same
    tensors."""
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    _run(first, 2, 2, "parallel.tp=2", "run.val_every=0")
    _run(
        second,
        2,
        1,
        "parallel.tp=2",
        "run.val_every=0",
        f"model.hf_weights={first / 'hf'}",
        "trainer.lr=1e-12",
        "trainer.min_lr=0",
        "trainer.warmup_steps=0",
    )
    a = {k: v for f in (first / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in (second / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-8, name
    # model.load: the same from the first run's last Megatron checkpoint (model + optimizer)
    from_ckpt = tmp_path / "from_ckpt"
    _run(
        from_ckpt,
        2,
        1,
        "parallel.tp=2",
        "run.val_every=0",
        f"model.load={first / 'checkpoints' / 'step_000002'}",
        "trainer.lr=1e-12",
        "trainer.min_lr=0",
        "trainer.warmup_steps=0",
    )
    d = {k: v for f in (from_ckpt / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    for name in a:
        assert (a[name] - d[name]).abs().max() < 1e-8, name
    # and the first run's two updates did move the weights away from a fresh random init
    third = tmp_path / "third"
    _run(
        third,
        2,
        1,
        "parallel.tp=2",
        "run.val_every=0",
        "trainer.lr=1e-12",
        "trainer.min_lr=0",
        "trainer.warmup_steps=0",
    )
    c = {k: v for f in (third / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert max((a[n] - c[n]).abs().max() for n in a) > 1e-4


PRESETS = [
    "sft",
    "reinforce",
    "ppo",
    "grpo",
    "dr_grpo",
    "cispo",
    "gspo",
    "rloo",
    "reinforce_pp",
    "srft",
    "luffy",
    "sft_then_grpo",
    "hpt_paper",
    "hpt",
]


@pytest.mark.parametrize("preset", [*PRESETS, "dapo"])
def test_every_preset_trains_a_step(tmp_path, preset):
    """Each preset's batch rule, advantage and loss run through the real loop (one process)."""
    extra = ["algorithm.options.overlong_buffer=8"] if preset == "dapo" else []
    if preset == "sft_then_grpo":
        extra = ["algorithm.options.switch_step=1"]  # step 1 is SFT, step 2 is GRPO
    out = tmp_path / preset
    # One process without torchrun (a world of one), forked after the imports to save their time.
    argv = _command(
        out,
        1,
        2,
        "parallel.tp=1",
        "run.val_every=0",
        "logging.save_rollouts=true",
        f"algorithm.preset={preset}",
        *extra,
    )
    argv = argv[argv.index("hpt_megatron.cli") + 1 :]
    code, output = run_cli(argv, tmp_path / "train.log")
    assert code == 0, output[-5000:]
    metrics = hpt_train.metrics(out)
    assert sorted(metrics) == [1, 2]
    import math

    for step, m in metrics.items():
        assert m["train/rows"] > 0 and "loss" in m and math.isfinite(m["grad_norm"])
        # The recorded batch is the one trained on, and loads back as a RolloutBatch.
        batch = RolloutBatch.load_jsonl(out / "rollouts" / f"step_{step:06d}.jsonl")
        assert batch.step == step - 1 and len(batch) == m["train/rows"]
    # Presets that learn from demonstrations get a gradient even while every rollout fails (a
    # random policy scores 0, so GRPO-style advantages are all 0 and so is their gradient).
    if preset in ("sft", "srft", "luffy", "hpt", "hpt_paper", "sft_then_grpo"):
        assert metrics[1]["grad_norm"] > 0


def test_a_model_the_preset_needs_but_the_run_lacks_is_a_config_error(tmp_path):
    """PPO's critic from a checkpoint that is not there: refused before any process trains."""
    proc = subprocess.run(
        _command(
            tmp_path / "ppo",
            1,
            1,
            "parallel.tp=1",
            "run.val_every=0",
            "algorithm.preset=ppo",
            f"algorithm.critic.load={tmp_path / 'no-critic'}",
        ),
        capture_output=True,
        text=True,
        env=hpt_train.env(),
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode != 0  # torchrun's own code; the process exits 2
    assert "config error: algorithm.critic.load:" in proc.stderr
    assert "is not a directory" in proc.stderr
    assert not (tmp_path / "ppo" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_virtual_pipeline_trains_checkpoints_resumes_and_exports(tmp_path):
    """PP=2 with two virtual stages per rank: the interleaved schedule trains, the checkpoint of
    both chunks resumes step for step after a SIGKILL, and the HF export holds every layer."""
    from transformers import AutoModelForCausalLM

    vpp = ["parallel.tp=1", "parallel.pp=2", "parallel.vpp=2", "model.inline.num_hidden_layers=4"]
    vpp += ["run.val_every=0"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(full, 2, 4, *vpp)
    _kill_after(killed, 4, *vpp, kill_at=3)
    _run(killed, 2, 4, *vpp)
    want, got = hpt_train.metrics(full), hpt_train.metrics(killed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(1, 5):
        for key in EXACT:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-9), (step, key)
    model = AutoModelForCausalLM.from_pretrained(full / "hf")
    assert len(model.model.layers) == 4


def test_paper_tiny_cpu_example_trains_and_resumes_after_sigkill(tmp_path):
    """examples/paper_tiny_cpu.yaml (the 1.5B paper config shrunk: bf16 with fp32 main weights,
    full recomputation, the distributed optimizer at DP=2, hpt_paper) as it is, for five steps;
    the same run SIGKILLed once step 4 is logged (step 2's checkpoint is complete: step 4's save
    waited for it) and resumed in new processes reproduces every step: the sharded optimizer
    state and the fp32 main weights come back from the checkpoint."""
    paper = ROOT / "examples" / "paper_tiny_cpu.yaml"
    quiet = ["checkpoint.save_every=2", "logging.progress_bar=false", "run.val_every=0"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    hpt_train.run(paper, full, "run.steps=5", *quiet)
    command = hpt_train.command(paper, killed, "run.steps=5", *quiet)
    _kill_after(killed, 5, kill_at=4, command=command)
    assert 5 not in hpt_train.metrics(killed)
    proc = hpt_train.run(paper, killed, "run.steps=5", *quiet)
    assert "resumed from" in proc.stderr
    want, got = hpt_train.metrics(full), hpt_train.metrics(killed)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5]
    assert all(m["grad_norm"] > 0 and m["train/rows"] > 0 for m in want.values())
    for step in range(1, 6):
        for key in EXACT:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-9), (step, key)
