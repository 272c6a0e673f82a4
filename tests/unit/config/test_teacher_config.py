"""The distillation teacher's config and preflight: a preset that needs one names the key, a
teacher with another vocabulary or one the layout cannot split is a problem naming both."""

from __future__ import annotations

import pathlib

import pytest

from hpt_megatron.config import ConfigError, load_config
from hpt_megatron.orchestration.preflight import preflight
from tests.helpers.tiny_hf import build_tiny_model, tiny_config

TINY = str(pathlib.Path(__file__).resolve().parents[3] / "examples" / "tiny_cpu.yaml")
# The tiny config's model, as an HF folder with the built-in arithmetic tokenizer.
TEACHER = dict(
    vocab_size=128,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=128,
    eos_token_id=2,
    bos_token_id=1,
    pad_token_id=0,
)


def _teacher(path: pathlib.Path, tokenizer: str | None = "arithmetic", **fields) -> str:
    from hpt_megatron.data.tokenizer import build_arithmetic_tokenizer
    from tests.helpers.tiny_hf import build_byte_tokenizer

    build_tiny_model(
        path, config=tiny_config("llama", **{**TEACHER, **fields}), with_tokenizer=False
    )
    if tokenizer == "arithmetic":
        build_arithmetic_tokenizer(path)
    elif tokenizer == "bytes":
        build_byte_tokenizer().save_pretrained(path)
    return str(path)


def test_opd_without_a_teacher_names_the_key():
    with pytest.raises(ConfigError, match=r"algorithm\.teacher\.hf_path: algorithm\.preset 'opd'"):
        load_config(TINY, ["algorithm.preset=opd"])
    with pytest.raises(ConfigError, match=r"algorithm\.teacher\.hf_path: set, but preset 'hpt'"):
        load_config(TINY, ["algorithm.teacher.hf_path=/somewhere"])
    with pytest.raises(ConfigError, match=r"algorithm\.options\.advantage: 'none'"):
        load_config(TINY, ["algorithm.options.advantage=none"])
    both = [
        "algorithm.preset=opd",
        "algorithm.teacher.hf_path=/t",
        "algorithm.teacher.urls=[http://h:1]",
    ]
    with pytest.raises(ConfigError, match=r"algorithm\.teacher\.hf_path and urls: set one"):
        load_config(TINY, both)
    cfg = load_config(TINY, ["algorithm.preset=opd", "algorithm.teacher.urls=[http://h:1]"])
    assert cfg.algorithm.teacher.urls == ["http://h:1"]


def test_a_matching_teacher_passes_preflight(tmp_path):
    path = _teacher(tmp_path / "t", num_layers=4, hidden_size=128, intermediate_size=256)
    cfg = load_config(TINY, ["algorithm.preset=opd", f"algorithm.teacher.hf_path={path}"])
    preflight(cfg, world_size=2)


@pytest.mark.parametrize(
    ("tokenizer", "fields", "message"),
    [
        ("bytes", {"vocab_size": 320}, "the teacher's tokenizer .* and the policy's"),
        (None, {"vocab_size": 320}, "has vocab_size 320 and no tokenizer, the policy"),
        ("arithmetic", {"num_heads": 3, "num_kv_heads": 3, "hidden_size": 48}, "does not fit"),
    ],
    ids=["another-tokenizer", "another-vocab-size", "layout"],
)
def test_a_bad_teacher_is_a_problem_naming_the_key(tmp_path, tokenizer, fields, message):
    path = _teacher(tmp_path / "t", tokenizer, **fields)
    cfg = load_config(TINY, ["algorithm.preset=opd", f"algorithm.teacher.hf_path={path}"])
    with pytest.raises(ConfigError, match=rf"algorithm\.teacher\.hf_path: .*{message}"):
        preflight(cfg, world_size=2)
