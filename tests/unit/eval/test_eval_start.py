"""``hpt eval`` is easy to start: benchmarks space- or comma-separated, names and data files
checked before the model loads (for ``--engine sglang`` too: the shared path, with the engine
loader replaced), the data folder named when it is missing, a progress bar, and ``summary.json``
with the settings and a mean row."""

import json
import re

import pytest

from hpt_megatron.data import build_arithmetic_tokenizer
from hpt_megatron.eval import BenchmarkResult, EvalOptions, format_table
from hpt_megatron.eval import cli as eval_cli
from hpt_megatron.eval.benchmarks import find_data_root, load_benchmarks, split_names
from hpt_megatron.eval.runner import mean_metrics, summary_rows
from hpt_megatron.rollout.base import Generation


class BoxedEngine:
    """Answers ``\\boxed{2i}`` to prompt ``i`` of each call: every sample right."""

    def __init__(self, tokenizer):
        self.tokenizer, self.shut = tokenizer, False

    def generate(self, prompts, params):
        out = []
        for i, prompt in enumerate(prompts):
            found = re.search(r"(\d+)\+\1=\?", self.tokenizer.decode(prompt))
            answer = 2 * int(found.group(1))
            ids = self.tokenizer(f"\\boxed{{{answer}}}", add_special_tokens=False)["input_ids"]
            gen = dict(prompt_index=i, token_ids=ids, logprobs=None, finish_reason="stop")
            out += [Generation(**gen) for _ in range(params.n)]
        return out

    def shutdown(self):
        self.shut = True


@pytest.fixture
def bench(tmp_path):
    rows = [{"prompt": f"{i}+{i}=?", "answer": str(2 * i)} for i in range(3)]
    path = tmp_path / "arith.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def no_model_load(monkeypatch, tmp_path):
    """The engine loaders, recording that they ran (no model is read)."""
    loads = []
    tok = build_arithmetic_tokenizer()

    def load(model, *rest):
        loads.append(model)
        return BoxedEngine(tok), tok

    monkeypatch.setattr(eval_cli, "load_engine", load)
    monkeypatch.setattr(eval_cli, "load_sglang_engine", load)
    monkeypatch.delenv("HPT_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # no data/ here
    (tmp_path / "model").mkdir()
    return loads


def test_benchmark_names_space_or_comma_separated():
    assert split_names(["aime24", "math500"]) == ["aime24", "math500"]
    assert split_names(["aime24,math500", "amc", "x.jsonl"]) == [
        "aime24",
        "math500",
        "amc",
        "x.jsonl",
    ]
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['aime23', 'math'\]"):
        split_names(["aime23,math500", "math"])


def test_the_data_folder_is_named_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("HPT_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"folder data \(the default, data/ in the working"):
        find_data_root()
    monkeypatch.setenv("HPT_DATA_ROOT", str(tmp_path / "env"))
    with pytest.raises(ValueError, match=r"env \(\$HPT_DATA_ROOT\) does not exist.*--data-root"):
        find_data_root()
    assert find_data_root(tmp_path) == tmp_path
    with pytest.raises(ValueError) as err:
        load_benchmarks(["aime24", "amc", str(tmp_path / "gone.jsonl")], tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"benchmark 'aime24': {tmp_path}/eval/unify/AIME24.json does not")
    assert "eval/luffy/valid.parquet does not exist" in lines[1]
    assert lines[2] == f"benchmark file {tmp_path / 'gone.jsonl'} does not exist"


@pytest.mark.parametrize("engine", ["cpu", "sglang"])
def test_mistakes_are_reported_before_the_model_loads(capsys, no_model_load, bench, engine):
    argv = ["--model", "model", "--engine", engine, "--no-progress"]
    if engine == "sglang":
        argv += ["--urls", "http://127.0.0.1:1"]
    assert eval_cli.main([*argv, "--benchmarks", "aime24", "math50"]) == 2
    assert "unknown benchmark(s) ['math50']" in capsys.readouterr().err
    assert eval_cli.main([*argv, "--benchmarks", "aime24", str(bench)]) == 2
    err = capsys.readouterr().err
    assert "benchmark data folder data (the default" in err and "--data-root" in err
    assert no_model_load == []


@pytest.mark.parametrize("engine", ["cpu", "sglang"])
def test_summary_records_the_settings_and_the_mean(capsys, no_model_load, bench, tmp_path, engine):
    argv = ["--model", "model", "--engine", engine, "--benchmarks", f"{bench},{bench}"]
    argv += ["--template", "raw", "--system-prompt", "none"]
    argv += ["--k", "2", "--temperature", "0.7", "--limit", "2", "--output-dir", "out"]
    if engine == "sglang":
        argv += ["--urls", "http://127.0.0.1:1"]
    assert eval_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "arith (generating)" in captured.err and "4/4" in captured.err  # the progress bar
    assert "summary: out/summary.json" in captured.out
    assert no_model_load == ["model"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["name"] for row in summary] == ["arith", "mean"]  # a file listed twice: once
    mean = summary[-1]
    assert mean["metrics"] == {"avg": 1.0, "pass@1": 1.0}  # pass@8, @32: more than k samples
    settings = mean["settings"]
    assert settings["model"] == "model" and settings["engine"] == engine
    assert settings["temperature"] == 0.7 and settings["top_p"] == 0.95
    assert (settings["k"], settings["limit"], settings["seed"]) == (2, 2, 0)
    assert settings["max_new_tokens"] == 8192 and settings["benchmarks"] == [str(bench)] * 2


def test_the_mean_row_of_table_and_summary():
    results = [
        BenchmarkResult("a", 10, 4, {"avg": 0.5, "pass@1": 0.5, "pass@4": 0.9}),
        BenchmarkResult("b", 20, 1, {"avg": 0.2, "pass@1": 0.2}),
    ]
    assert mean_metrics(results) == pytest.approx({"avg": 0.35, "pass@1": 0.35, "pass@4": 0.9})
    rows = summary_rows(results, EvalOptions().settings())
    assert rows[-1]["name"] == "mean" and rows[-1]["num_problems"] == 30
    assert format_table(results).splitlines()[-1].split() == ["mean", "30", "35.0", "35.0", "90.0"]
