"""``run.replay_rollouts``: a run recorded with ``logging.save_rollouts`` (fp32, TP=1) trained again
on its recorded batches at TP=2 and at PP=2, without a rollout engine, gives the recorded run's
loss and gradient norm at every step; and the replay's config errors."""

from __future__ import annotations

import pathlib

import pytest

from hpt_megatron.config import ConfigError, load_config
from hpt_megatron.data.sample import RolloutBatch
from hpt_megatron.orchestration.preflight import preflight
from tests.helpers import hpt_train
from tests.helpers.forked import run_cli

CONFIG = hpt_train.TINY
SMALL = [
    "run.val_every=0",
    "data.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "data.max_response_tokens=32",
    "checkpoint.save_every=0",
    "checkpoint.export_hf=false",
    "logging.progress_bar=false",
    "reward.num_workers=1",
    # Kept rollouts (a random policy fails every prompt: HPT's gate would train on
    # demonstrations only); the entropy bonus gives them a gradient while every reward is 0.
    "algorithm.preset=grpo",
    "algorithm.options.entropy_coef=0.01",
]


def _init_weights(folder: pathlib.Path) -> None:
    """The tiny example's model as an HF folder: every layout starts from the same weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    inline = dict(load_config(CONFIG).model.inline)
    config = AutoConfig.for_model(**{k: v for k, v in inline.items() if k != "architectures"})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """A 2-step run at TP=1 with its batches recorded: (initial HF weights, run directory)."""
    tmp = tmp_path_factory.mktemp("replay")
    init, out = tmp / "init", tmp / "recorded"
    _init_weights(init)
    argv = ["train", CONFIG, f"run.output_dir={out}", "run.steps=2", "parallel.tp=1"]
    argv += [*SMALL, f"model.hf_weights={init}", "logging.save_rollouts=true"]
    code, output = run_cli(argv, tmp / "record.log")
    assert code == 0, output[-5000:]
    return init, out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.tp=2"],
        ["parallel.tp=1", "parallel.pp=2"],
    ],
    ids=["tp2", "pp2"],
)
def test_a_recorded_run_replays_at_another_layout(recorded, layout, tmp_path):
    init, run = recorded
    folder = run / "rollouts"
    for step in (1, 2):  # what a record holds
        batch = RolloutBatch.load_jsonl(folder / f"step_{step:06d}.jsonl")
        rollouts = [s for s in batch.samples if not s.is_demo]
        assert rollouts and all(s.prompt_ids and s.response_ids for s in batch.samples)
        assert all(s.reward is not None and s.rollout_logprobs for s in rollouts)
        assert all(len(s.rollout_logprobs or []) == len(s.response_ids) for s in rollouts)
        assert {s.weight_version for s in rollouts} == {step - 1}
    want = hpt_train.metrics(run)
    out = tmp_path / "replay"
    replay = f"run.replay_rollouts={folder}"
    hpt_train.run(CONFIG, out, *SMALL, "run.steps=2", f"model.hf_weights={init}", replay, *layout)
    got = hpt_train.metrics(out)
    assert sorted(got) == [1, 2]
    assert not (out / "rollout_weights").exists()  # no engine, nothing synced
    for step in (1, 2):
        assert got[step]["train/rows"] == want[step]["train/rows"]
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5)


def test_replay_config_errors(tmp_path):
    """A missing folder, a folder without records, more steps than recorded and validation are
    config errors naming ``run.replay_rollouts`` / ``run.val_every``, before any process starts."""
    records = tmp_path / "rollouts"
    records.mkdir()

    def check(*overrides: str) -> str:
        base = [f"run.output_dir={tmp_path / 'run'}", "parallel.tp=1", "run.val_every=0"]
        with pytest.raises(ConfigError) as err:
            preflight(load_config(CONFIG, [*base, *overrides]), world_size=1)
        return str(err.value)

    assert "is not a directory" in check(f"run.replay_rollouts={tmp_path / 'nope'}")
    assert "holds no step_N.jsonl" in check(f"run.replay_rollouts={records}")
    for step in (1, 2):
        (records / f"step_{step:06d}.jsonl").write_text("")
    message = check(f"run.replay_rollouts={records}", "run.steps=3")
    assert message.startswith("run.replay_rollouts:") and "no batch for step 3" in message
    assert "records steps 1..2" in message
    with pytest.raises(ConfigError, match="run.val_every: validation generates"):
        load_config(CONFIG, [f"run.replay_rollouts={records}", "run.val_every=5"])
    # Two recorded steps are enough for run.steps=2.
    preflight(
        load_config(
            CONFIG,
            [
                f"run.output_dir={tmp_path / 'run'}",
                "parallel.tp=1",
                "run.val_every=0",
                "run.steps=2",
                f"run.replay_rollouts={records}",
            ],
        ),
        world_size=1,
    )
