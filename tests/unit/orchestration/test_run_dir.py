"""A run directory belongs to its run: another model there is refused before anything is
written; another parallel layout is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpt_megatron.cli import main
from hpt_megatron.config import dump_yaml, load_config
from hpt_megatron.models.hf_io import write_config
from hpt_megatron.orchestration.loop import resolve_model_config
from hpt_megatron.orchestration.run_dir import check_run_dir

TINY = str(Path(__file__).resolve().parents[3] / "examples" / "tiny_cpu.yaml")


def _old_run(out: Path, *overrides: str) -> None:
    out.mkdir(parents=True)
    dump_yaml(load_config(TINY, [f"run.output_dir={out}", *overrides]), out / "config.yaml")
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "vocab.json").write_text("{}")


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_another_model_in_an_old_run_directory_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch, capsys
):
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    _old_run(out)
    before = _files(out)
    code = main(
        ["train", TINY, f"run.output_dir={out}", "parallel.tp=1", "model.inline.hidden_size=64"]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hpt train: run.output_dir {out} holds a run of another model"), err
    assert "hidden_size: 128 there, 64 here" in last and "nothing was written" in last
    assert "Traceback" not in err
    assert _files(out) == before  # config.yaml and the tokenizer byte-identical


def test_the_newest_checkpoint_speaks_for_the_model_without_a_config(tmp_path: Path):
    out = tmp_path / "run"
    step = out / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("ok\n")
    other = resolve_model_config(load_config(TINY, ["model.inline.num_hidden_layers=3"]))
    write_config(other, step)
    hf = resolve_model_config(load_config(TINY))
    with pytest.raises(ValueError, match="num_hidden_layers: 3 there, 2 here"):
        check_run_dir(out, hf)
    assert json.loads((step / "config.json").read_text())["num_hidden_layers"] == 3


def test_the_same_model_at_another_layout_may_resume_there(tmp_path: Path):
    out = tmp_path / "run"
    _old_run(out, "parallel.tp=2")
    check_run_dir(out, resolve_model_config(load_config(TINY, ["parallel.tp=1"])))
    check_run_dir(tmp_path / "new", resolve_model_config(load_config(TINY)))  # no folder yet
