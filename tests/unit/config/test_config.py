"""Configuration: YAML + dotted overrides, unknown keys, types, impossible values, round trip."""

import pathlib

import pytest

from hpt_megatron.config import ConfigError, HPTConfig, dump_yaml, load_config
from hpt_megatron.config.base import parse_override
from hpt_megatron.config.sections import ParallelConfig
from hpt_megatron.models.provider import check_parallel_against_model, load_hf_config
from hpt_megatron.parallel.runtime import check_world_size

EXAMPLE = pathlib.Path(__file__).resolve().parents[3] / "examples" / "tiny_cpu.yaml"

YAML = """\
model:
  inline: {num_attention_heads: 8, num_key_value_heads: 2}
run:
  name: unit
  steps: 7
parallel:
  tp: 2
trainer:
  lr: 1e-6
  weight_decay: 1.0e-2
  grad_clip: 0
data:
  arithmetic:
    levels: [1, 2]
"""

HF = load_hf_config(
    {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
    }
)


@pytest.fixture
def config_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(YAML)
    return path


def test_yaml_file_loads_with_types(config_file):
    cfg = load_config(config_file)
    assert isinstance(cfg, HPTConfig)
    assert cfg.run.name == "unit" and cfg.run.steps == 7 and cfg.parallel.tp == 2
    # PyYAML alone reads "1e-6" as a string (YAML 1.1); users write it anyway.
    assert cfg.trainer.lr == 1e-6 and isinstance(cfg.trainer.lr, float)
    assert cfg.trainer.weight_decay == 0.01
    assert cfg.trainer.grad_clip == 0.0 and isinstance(cfg.trainer.grad_clip, float)
    assert cfg.data.arithmetic.levels == [1, 2]
    assert cfg.trainer.adam_beta1 == 0.9  # untouched keys keep their defaults


def test_dotted_overrides_parse_and_win_over_the_file(config_file):
    cfg = load_config(
        config_file,
        [
            "trainer.lr=1e-6",
            "parallel.tp=1",
            "trainer.use_distributed_optimizer=true",
            "data.arithmetic.levels=[3, 4, 5]",
            "model.rope_theta=4e4",
            "trainer.skip_update_grad_norm=80",
            "run.name=exp.v2",
            "trainer.adam_eps=1E-8",
        ],
    )
    assert cfg.trainer.lr == 1e-6 and isinstance(cfg.trainer.lr, float)
    assert cfg.parallel.tp == 1
    assert cfg.trainer.use_distributed_optimizer is True
    assert cfg.data.arithmetic.levels == [3, 4, 5]
    assert cfg.model.rope_theta == 40000.0
    assert cfg.trainer.skip_update_grad_norm == 80.0
    assert cfg.run.name == "exp.v2"
    assert cfg.trainer.adam_eps == 1e-8
    assert cfg.run.steps == 7  # from the file


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("trainer.lr=1e-6", ["trainer", "lr"], 1e-6),
        ("a.b.c=[1, 2]", ["a", "b", "c"], [1, 2]),
        ("x=false", ["x"], False),
        ("x=null", ["x"], None),
        ("x=12", ["x"], 12),
        ("x=a=b", ["x"], "a=b"),
    ],
)
def test_parse_override(text, path, value):
    got_path, got = parse_override(text)
    assert got_path == path and got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["trainer.lr", "=3", "trainer..lr=3"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainr.lr=1", "unknown key 'trainr'; did you mean 'trainer'?"),
        ("trainer.lrr=1", "unknown key 'trainer.lrr'; did you mean 'trainer.lr'?"),
        ("parallel.tensor_parallel=2", "unknown key 'parallel.tensor_parallel'"),
        (
            "data.arithmetic.levles=[1]",
            "unknown key 'data.arithmetic.levles'; did you mean 'data.arithmetic.levels'?",
        ),
    ],
)
def test_unknown_key_names_it_and_the_closest(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_key_in_a_file_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  learning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.learning_rate'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("parallel.tp=two", r"parallel.tp: expected int, got str 'two'"),
        ("parallel.tp=true", r"parallel.tp: expected int, got bool"),
        ("parallel.tp=2.5", r"parallel.tp: expected int, got float"),
        ("trainer.lr=fast", r"trainer.lr: expected float, got str 'fast'"),
        (
            "trainer.use_distributed_optimizer=3",
            r"trainer.use_distributed_optimizer: expected bool",
        ),
        ("data.arithmetic.levels=1", r"data.arithmetic.levels: expected a list"),
        ("data.arithmetic.levels=[1, x]", r"data.arithmetic.levels\[1\]: expected int"),
        ("trainer.lr_schedule=linear", r"trainer.lr_schedule: 'linear' is not one of"),
        ("trainer=3", r"trainer: expected a mapping"),
    ],
)
def test_wrong_type_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.sequence_parallel=true"], r"parallel.sequence_parallel: needs tp > 1"),
        (["parallel.tp=0"], r"parallel.tp: must be >= 1"),
        (["parallel.vpp=2"], r"parallel.vpp: "),
        (["trainer.lr=-1e-5"], r"trainer.lr: must be > 0"),
        (["run.steps=0"], r"run.steps: must be >= 1"),
    ],
)
def test_impossible_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_sequence_parallel_with_tp2_is_fine():
    cfg = load_config(
        None, ["parallel.sequence_parallel=true", "parallel.tp=2", "model.hf_config=/models/x"]
    )
    assert cfg.parallel.sequence_parallel and cfg.parallel.tp == 2


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        (ParallelConfig(tp=3), r"parallel.tp=3 does not divide num_attention_heads=8"),
        (ParallelConfig(tp=4), r"parallel.tp=4 does not divide .*num_key_value_heads=2"),
        (ParallelConfig(pp=3), r"parallel.pp=3 .*does not divide num_hidden_layers=4"),
        (ParallelConfig(pp=2, vpp=4), r"parallel.pp=2 \(x vpp=4\) does not divide"),
    ],
)
def test_parallel_layout_that_cannot_split_the_model(parallel, message):
    with pytest.raises(ConfigError, match=message):
        check_parallel_against_model(HF, parallel)


def test_parallel_layout_that_splits_the_model():
    check_parallel_against_model(HF, ParallelConfig(tp=2, pp=2, vpp=2))


def test_world_size_must_be_divisible_by_model_parallel():
    assert check_world_size(ParallelConfig(tp=2, pp=2), 8) == 2
    assert check_world_size(ParallelConfig(tp=2, cp=2), 4) == 1
    message = (
        r"parallel.tp \* parallel.pp \* parallel.cp = 2 \* 2 \* 1 = 4 does not divide the world"
    )
    with pytest.raises(ConfigError, match=message + " size 6"):
        check_world_size(ParallelConfig(tp=2, pp=2), 6)
    with pytest.raises(ConfigError, match="world size 2"):
        check_world_size(ParallelConfig(cp=4), 2)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing)


def test_non_mapping_file_is_named(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=f"{path}: the top level must be a mapping"):
        load_config(path)


@pytest.mark.parametrize("source", ["file", "example"])
def test_resolved_config_round_trips(config_file, tmp_path, source):
    path = config_file if source == "file" else EXAMPLE
    cfg = load_config(path, ["trainer.lr=3e-4", "data.arithmetic.levels=[2]"])
    out = tmp_path / "resolved.yaml"
    dump_yaml(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.trainer.lr == 3e-4 and again.data.arithmetic.levels == [2]


def test_output_dir_interpolates_the_run_name(config_file):
    assert load_config(config_file).run.run_dir == "runs/unit"  # the default runs/${run.name}
    cfg = load_config(config_file, ["run.name=exp2", "run.output_dir=/tmp/${run.name}/out"])
    assert cfg.run.output_dir == cfg.run.run_dir == "/tmp/exp2/out"


def test_interpolation_of_environment_and_other_keys(config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HPT_TEST_DATA", str(tmp_path))
    path = tmp_path / "cfg.yaml"
    path.write_text(
        YAML + "  train: ${oc.env:HPT_TEST_DATA}/train.jsonl\n"
        "rollout:\n  max_new_tokens: ${data.max_response_tokens}\n"
    )
    cfg = load_config(path, ["data.max_response_tokens=77"])
    assert cfg.data.train == f"{tmp_path}/train.jsonl"
    assert cfg.rollout.max_new_tokens == 77 and isinstance(cfg.rollout.max_new_tokens, int)
    monkeypatch.delenv("HPT_TEST_DATA")
    with pytest.raises(ConfigError, match=r"^data.train: .*HPT_TEST_DATA' not found"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^run.output_dir: Interpolation key 'name' not found"):
        load_config(config_file, ["run.output_dir=runs/${name}"])


def test_invalid_yaml_is_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("parallel.cp=2", r"^parallel.cp: 2: context parallel is not wired"),
        (
            "rollout.sglang.weight_sync=distributed rollout.sglang.urls=[http://h:1]",
            r"^rollout.sglang.weight_sync: distributed: the servers of urls may not reach",
        ),
        (
            "rollout.sglang.weight_sync=tensor rollout.sglang.urls=[http://h:1]",
            r"^rollout.sglang.weight_sync: tensor: the servers of urls may run on another host",
        ),
        ("logging.log_every=10", r"^unknown key 'logging.log_every'"),
    ],
)
def test_settings_hpt_train_cannot_carry_out_are_rejected(config_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file, override.split())
