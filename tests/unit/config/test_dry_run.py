"""``hpt train CONFIG [key=value ...] --dry-run``: every example config, the flag's placement, the
world size (``WORLD_SIZE``, ``--world-size``) and what preflight finds missing on this machine."""

import pathlib

import pytest
import yaml

from hpt_megatron.cli import main
from hpt_megatron.config import load_config, to_dict

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "examples"
TINY = str(EXAMPLES / "tiny_cpu.yaml")
CPU_EXAMPLES = (
    "tiny_cpu.yaml",
    "tiny_moe_cpu.yaml",
    "paper_tiny_cpu.yaml",
)  # tiny_moe_cpu: tests/unit/config/test_moe
PAPER = sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name not in CPU_EXAMPLES)


@pytest.fixture(autouse=True)
def _no_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def _dry_run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["train", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_example_is_dry_run():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert names == {*CPU_EXAMPLES, *PAPER}


def test_tiny_cpu_dry_runs_and_prints_the_resolved_config(capsys):
    code, out, err = _dry_run(capsys, TINY, "--dry-run", "--world-size", "2")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["run"]["output_dir"] == "runs/tiny_cpu"  # runs/${run.name}, resolved
    assert printed["algorithm"]["options"] == {"entropy_coef": 0.0}  # only the options set
    assert printed == to_dict(load_config(TINY))


@pytest.mark.parametrize("name", PAPER)
def test_paper_examples_load_and_name_the_missing_model(capsys, name):
    cfg = load_config(EXAMPLES / name)  # the config itself is valid
    code, out, err = _dry_run(capsys, str(EXAMPLES / name), "--dry-run", "--world-size", "8")
    assert code == 2 and out == ""
    assert err.startswith(f"hpt train: config error: model.hf_config: {cfg.model.hf_config}")


@pytest.mark.parametrize(
    "args",
    [
        ["--dry-run", "parallel.tp=1"],
        ["parallel.tp=1", "--dry-run"],
        ["run.steps=3", "--dry-run", "parallel.tp=1"],
        ["--world-size=1", "parallel.tp=1", "--dry-run"],
    ],
)
def test_the_flag_goes_anywhere_after_the_config(capsys, args):
    code, out, err = _dry_run(capsys, TINY, *args)
    assert code == 0, err
    assert yaml.safe_load(out)["parallel"]["tp"] == 1


def test_world_size_defaults_to_one_and_comes_from_torchrun(capsys, monkeypatch):
    code, _, err = _dry_run(capsys, TINY, "--dry-run")  # tp=2 in a world of one
    assert code == 2 and "parallel.tp * parallel.pp * parallel.cp" in err and "size 1" in err
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, _, err = _dry_run(capsys, TINY, "--dry-run")
    assert code == 2 and "world size 3" in err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _dry_run(capsys, TINY, "--dry-run")[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--world-size"], "--world-size: expected a positive integer"),
        (["--world-size", "0"], "--world-size: expected a positive integer"),
        (["--dryrun"], "unknown option '--dryrun'"),
        (["--world-size", "2"], "--world-size goes with --dry-run"),
    ],
)
def test_bad_flags(capsys, args, message):
    code, _, err = _dry_run(capsys, TINY, *args)
    assert code == 2 and message in err


def test_tensor_weight_sync_over_several_nodes_is_refused(capsys, monkeypatch):
    """``tensor`` hands the servers this host's memory: two nodes of two ranks are refused, one
    node of four is not (for that reason)."""
    sync = ["rollout.engine=sglang", "rollout.sglang.device=cpu"]
    sync += ["rollout.sglang.weight_sync=tensor", "parallel.tp=1"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    code, out, err = _dry_run(capsys, TINY, "--dry-run", "--world-size", "4", *sync)
    assert code == 2 and "weight_sync: tensor hands the servers this host's memory" in err, err
    assert "4 ranks, 2 on this one" in err
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    code, out, err = _dry_run(capsys, TINY, "--dry-run", "--world-size", "4", *sync)
    assert "this host's memory" not in err, err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.lrr=1"], "unknown key 'trainer.lrr'; did you mean 'trainer.lr'?"),
        (["data.train=/nope/train.parquet"], "data.train: dataset file not found: /nope"),
        (["reward.fn=nope_pkg.mod:fn"], "reward.fn: reward 'nope_pkg.mod:fn': cannot import"),
        (["model.tokenizer=/nope/tok"], "model.tokenizer: /nope/tok does not exist"),
        (["model.hf_weights=/nope/w"], "model.hf_weights: /nope/w is not a directory"),
        (
            ["rollout.engine=sglang", "rollout.sglang.python=/nope/python"],
            "rollout.engine: sglang needs SGLang's python, /nope/python is not there",
        ),
        (
            ["parallel.tp=1", "parallel.pp=4"],
            "parallel.pp=4 (x vpp=1) does not divide num_hidden_layers=2",
        ),
        (["run.resume=/nope/ckpt"], "run.resume: /nope/ckpt is not a checkpoint directory"),
        (
            ["algorithm.options.kl_coef=0.01", "algorithm.reference.load=/nope/ref"],
            "algorithm.reference.load: /nope/ref is not a directory",
        ),
        (
            ["algorithm.preset=ppo", "algorithm.critic.load=/nope/critic"],
            "algorithm.critic.load: /nope/critic is not a directory",
        ),
        (
            ["algorithm.options.kl_coef=0.01", "algorithm.reference.offload=true"],
            "algorithm.reference.offload: moving the reference's weights to host memory",
        ),
        (["rollout.partial=true"], "rollout.partial: partial rollouts continue generations"),
        (["run.max_staleness=-1"], "run.max_staleness: must be >= 0"),
        (
            ["model.transformer_impl=transformer_engine"],
            "model.transformer_impl: transformer_engine needs a GPU",
        ),
        (
            ["model.params_dtype=bf16", "model.fp8=hybrid"],
            "model.fp8: hybrid: FP8 training needs transformer_engine layers on a GPU",
        ),
        (["parallel.backend=nccl"], "parallel.backend: nccl needs GPUs"),
        (
            ["parallel.tp=2", "parallel.sequence_parallel=true"],
            "parallel.sequence_parallel: Megatron's local layers",
        ),
    ],
)
def test_preflight_names_the_key(capsys, overrides, message):
    code, out, err = _dry_run(capsys, TINY, "--dry-run", "--world-size", "4", *overrides)
    assert code == 2 and out == ""
    assert err.startswith("hpt train: config error: ") and message in err, err


@pytest.mark.parametrize(
    "recompute",
    [
        ["model.recompute_granularity=full", "model.recompute_method=uniform"],
        ["model.recompute_granularity=full", "model.recompute_method=block"],
        ["model.recompute_granularity=selective"],
    ],
    ids=["full-uniform", "full-block", "selective"],
)
def test_paper_training_settings_pass_on_cpu(capsys, recompute):
    """bf16 with fp32 main weights, the distributed optimizer and recomputation train on the
    CPU (tests/distributed/test_paper_path.py): preflight lets them through."""
    paper = ["model.params_dtype=bf16", "trainer.use_distributed_optimizer=true", *recompute]
    code, _, err = _dry_run(capsys, TINY, "--dry-run", "--world-size", "2", *paper)
    assert code == 0, err


def test_data_files_are_read(capsys, tmp_path):
    good, bad = tmp_path / "train.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"prompt": "1+1=?", "answer": "2"}\n')
    bad.write_text('{"question": "1+1=?"}\n')
    args = [TINY, "--dry-run", "--world-size", "2"]
    assert _dry_run(capsys, *args, f"data.train={good}")[0] == 0
    code, _, err = _dry_run(capsys, *args, f"data.train={good}", f"data.val={bad}")
    assert code == 2 and "data.val: " in err


def test_packing_with_transformer_engine_layers_is_rejected(capsys, monkeypatch):
    # Error path only: pretend a GPU is visible, where auto picks Transformer Engine layers,
    # whose THD packed format the trainer does not wire in.
    from hpt_megatron.orchestration import preflight

    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: True)
    code, out, err = _dry_run(capsys, TINY, "--dry-run", "parallel.tp=1", "trainer.packing=true")
    assert code == 2 and out == ""
    assert "trainer.packing: packed rows run on Megatron's local attention" in err, err


def test_wandb_project_without_wandb_installed_is_a_problem(capsys, monkeypatch):
    """A config naming a wandb project fails the dry run, not the start of training, where wandb
    cannot be imported (``sys.modules[name] = None`` makes the import fail)."""
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    args = [TINY, "--dry-run", "--world-size", "2", "logging.wandb_project=hpt"]
    code, out, err = _dry_run(capsys, *args)
    assert code == 2 and out == ""
    assert "logging.wandb_project: hpt needs wandb, which is not installed" in err, err
    assert "pip install 'hpt-megatron[wandb]'" in err, err
