"""The distillation teacher's config and preflight: a preset that needs one names the key, a
teacher with another vocabulary or one the layout cannot split is a problem naming both."""

from __future__ import annotations

import pathlib

import pytest

from hpt_megatron.config import ConfigError, load_config
from hpt_megatron.orchestration.preflight import preflight
from tests.helpers.tiny_hf import build_tiny_teacher as _teacher

TINY = str(pathlib.Path(__file__).resolve().parents[3] / "examples" / "tiny_cpu.yaml")


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


def test_teacher_written_demonstrations_need_a_teacher_and_no_distillation(tmp_path):
    """``teacher_route: generate`` needs a teacher (the key named, and why), and with one the
    config holds without the distillation part; the layout check is the trainer copy's, which
    such a run does not build."""
    generate = "algorithm.options.teacher_route=generate"
    with pytest.raises(ConfigError, match=r"teacher\.hf_path: .*teacher_route=generate"):
        load_config(TINY, [generate])
    path = _teacher(tmp_path / "t", num_heads=3, num_kv_heads=3, hidden_size=48)
    cfg = load_config(TINY, [generate, f"algorithm.teacher.hf_path={path}"])
    assert cfg.algorithm.spec().needs_teacher_demos
    assert not cfg.algorithm.spec().needs_teacher_logprobs
    preflight(cfg, world_size=2)  # TP=2 could not split its 3 heads; it is not split
