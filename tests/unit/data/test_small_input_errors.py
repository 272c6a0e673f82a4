"""Small input mistakes, each one clear message: a renamed prompt or answer column (the file's
columns listed, no warning per row), a converter path that does not exist, a truncated
``model.safetensors``, ``run.resume`` naming ``step_4`` where the folder is ``step_000004``."""

import json
import logging
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from hpt_megatron.cli import main as hpt_main
from hpt_megatron.convert import main as convert_main
from hpt_megatron.data import FieldMap, read_examples
from hpt_megatron.models.hf_io import HFCheckpointReader

TINY = str(pathlib.Path(__file__).resolve().parents[3] / "examples" / "tiny_cpu.yaml")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_renamed_prompt_column_is_one_message_with_the_columns(tmp_path, caplog):
    rows = [{"question": f"{i}+1=?", "answer": str(i + 1), "level": 1} for i in range(200)]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as err:
        read_examples(path)
    assert str(err.value) == (
        f"{path}: 200 of 200 rows have no prompt field 'prompt' (data.prompt_key); "
        "the file's columns: question, answer, level"
    )
    assert "skipping" not in caplog.text  # no warning per row
    assert len(read_examples(path, fields=FieldMap(prompt="question"))[0]) == 200
    renamed = _jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "solution": "1"}] * 10)
    with pytest.raises(
        ValueError,
        match=r"10 of 10 rows have no answer field .*data.answer_key.*columns: prompt, solution",
    ):
        read_examples(renamed)
    # a few rows without a prompt (within data.max_bad_row_share) are still skipped one by one
    few = _jsonl(tmp_path / "few.jsonl", [{"prompt": "q", "answer": "1"}] * 99 + [{"answer": "1"}])
    assert len(read_examples(few)[0]) == 99


def test_the_dry_run_names_the_key_and_the_columns(tmp_path, capsys, monkeypatch):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    path = _jsonl(tmp_path / "train.jsonl", [{"question": "1+1=?", "answer": "2"}] * 5)
    code = hpt_main(["train", TINY, "--dry-run", "--world-size", "2", f"data.train={path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"hpt train: config error: data.train: {path}: 5 of 5")
    assert "(data.prompt_key); the file's columns: question, answer" in err


def test_a_converter_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert convert_main(["hf-to-megatron", "--hf", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: --hf: {missing} does not exist\n"
    argv = ["megatron-to-hf", "--load", str(tmp_path), "--out", str(tmp_path / "o")]
    assert convert_main([*argv, "--hf-config", str(missing)]) == 2
    assert f"--hf-config: {missing} does not exist" in capsys.readouterr().err


def test_a_truncated_safetensors_file_is_named(tmp_path, capsys):
    from hpt_megatron.rollout.cpu_engine import HFCpuEngine

    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.zeros(1000)}, folder / "model.safetensors")
    whole = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    (folder / "config.json").write_text("{}")
    message = "model.safetensors: not a readable safetensors file .* truncated or corrupt"
    with pytest.raises(ValueError, match=message):
        HFCheckpointReader(folder)
    with pytest.raises(ValueError, match=message):
        HFCpuEngine.from_pretrained(folder)


def test_resume_from_step_4_points_at_step_000004(tmp_path, capsys, monkeypatch):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "checkpoints" / "step_000004").mkdir(parents=True)
    args = ["train", TINY, "--dry-run", "--world-size", "2"]
    assert hpt_main([*args, f"run.resume={tmp_path / 'checkpoints' / 'step_000004'}"]) == 0
    capsys.readouterr()
    assert hpt_main([*args, f"run.resume={tmp_path / 'checkpoints' / 'step_4'}"]) == 2
    err = capsys.readouterr().err
    assert "step_4 is not a checkpoint directory; the checkpoint folders have six digits" in err
    assert err.rstrip().endswith("checkpoints/step_000004")
