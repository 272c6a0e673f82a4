import json
import math

import pytest
import torch

from hpt_megatron.data import build_arithmetic_tokenizer
from hpt_megatron.data.templates import PromptTemplate
from hpt_megatron.eval import EvalOptions, format_table, load_benchmark, pass_at_k, run_eval
from hpt_megatron.eval.cli import main
from hpt_megatron.rollout.base import Generation, RolloutEngine, SamplingParams


class HFGenerateEngine:
    """Test-only engine: Hugging Face ``generate`` on CPU (the product engine lives elsewhere)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        torch.manual_seed(params.seed or 0)
        out = []
        for i, prompt in enumerate(prompts):
            seqs = self.model.generate(
                torch.tensor([prompt]),
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                max_new_tokens=params.max_new_tokens,
                num_return_sequences=params.n,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            for seq in seqs[:, len(prompt) :].tolist():
                out.append(
                    Generation(prompt_index=i, token_ids=seq, logprobs=None, finish_reason="length")
                )
        return out

    def update_weights(self, buckets, version):  # pragma: no cover - protocol filler
        raise NotImplementedError

    def update_weights_from_disk(self, path, version):  # pragma: no cover - protocol filler
        raise NotImplementedError

    def release_memory(self):
        pass

    def resume_memory(self):
        pass

    def health(self):
        return True

    @property
    def restarts(self):
        return 0

    def shutdown(self):
        pass


class ScriptedEngine(HFGenerateEngine):
    """Answers with a fixed response per prompt position: exact metrics without a model."""

    def __init__(self, tokenizer, answers):
        super().__init__(None, tokenizer)
        self.answers, self.calls = answers, 0

    def generate(self, prompts, params):
        out = []
        for i, _ in enumerate(prompts):
            for j in range(params.n):
                text = self.answers(self.calls + i, j)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                out.append(
                    Generation(prompt_index=i, token_ids=ids, logprobs=None, finish_reason="stop")
                )
        self.calls += len(prompts)
        return out


@pytest.fixture(scope="module")
def tok():
    return build_arithmetic_tokenizer()


def _write_bench(path, n=6):
    rows = [{"prompt": f"{i}+{i}=?", "answer": str(2 * i)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert pass_at_k(32, 5, 8) == pytest.approx(1 - math.comb(27, 8) / math.comb(32, 8))
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_run_eval_with_a_tiny_hf_model(tmp_path, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    engine = HFGenerateEngine(LlamaForCausalLM(config).eval(), tok)
    assert isinstance(engine, RolloutEngine)
    options = EvalOptions(
        k=3, max_new_tokens=6, pass_ks=[1, 2], template=PromptTemplate(system_prompt=None)
    )
    bench = _write_bench(tmp_path / "arith.jsonl")
    results = run_eval(engine, tok, [str(bench)], options=options, output_dir=tmp_path / "out")
    assert results[0].num_problems == 6 and results[0].k == 3
    assert set(results[0].metrics) == {"avg", "pass@1", "pass@2"}
    rows = [
        json.loads(line) for line in (tmp_path / "out/responses.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 18 and {r["score"] for r in rows} <= {0.0, 1.0}
    assert all(r["response_tokens"] <= 6 for r in rows)
    assert json.loads((tmp_path / "out/summary.json").read_text())[0]["name"] == "arith"


def test_run_eval_metrics_table_and_named_benchmark(tmp_path, tok, shared_data):
    # problem p, sample j: correct when j < p (p = 0..5), so avg@4 = mean(min(p, 4)) / 4
    engine = ScriptedEngine(tok, lambda p, j: f"\\boxed{{{2 * p if j < p else -1}}}")
    bench = _write_bench(tmp_path / "arith.jsonl")
    options = EvalOptions(k=4, pass_ks=[1, 4, 8], template=PromptTemplate(system_prompt=None))
    (res,) = run_eval(engine, tok, [str(bench)], options=options)
    assert res.metrics["avg"] == pytest.approx(sum(min(p, 4) for p in range(6)) / 24)
    assert res.metrics["pass@4"] == pytest.approx(5 / 6) and "pass@8" not in res.metrics
    aime = ScriptedEngine(tok, lambda p, j: "\\boxed{204}")
    options = EvalOptions(k=2, limit=2, pass_ks=[1, 2])
    results = run_eval(aime, tok, ["aime24"], options=options, data_root=shared_data)
    assert results[0].metrics["avg"] == 0.5  # AIME24 problem 0's answer is 204
    table = format_table([res, *results])
    assert table.splitlines()[0].split() == [
        "benchmark",
        "problems",
        "k",
        "avg@k",
        "pass@1",
        "pass@2",
        "pass@4",
    ]
    assert table.splitlines()[-1].startswith("mean")


def test_named_benchmarks_map_onto_shared_files(shared_data):
    sizes = {
        "aime24": 30,
        "aime25": 30,
        "amc": 83,
        "math500": 500,
        "minerva": 272,
        "olympiadbench": 674,
        "gpqa": 198,
        "arc_c": 1172,
    }
    for name, size in sizes.items():
        bench, examples = load_benchmark(name, shared_data)
        assert len(examples) == size, name
    assert load_benchmark("aime24", shared_data)[0].k == 32
    assert load_benchmark("gpqa", shared_data)[0].reward == "multiple_choice"
    with pytest.raises(ValueError, match="unknown benchmark 'aime23'"):
        load_benchmark("aime23", shared_data)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["--megatron-checkpoint", str(tmp_path)]) == 2
    assert "could not convert" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--urls", "http://127.0.0.1:1"]) == 2
    assert "--urls needs --engine sglang" in capsys.readouterr().err
    argv = ["--model", str(tmp_path), "--engine", "sglang", "--urls", "localhost"]
    assert main(argv) == 2
    assert "urls[0]: 'localhost' must be http" in capsys.readouterr().err


def test_cli_end_to_end_with_the_cpu_engine(tmp_path, tok, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    bench = _write_bench(tmp_path / "arith.jsonl", n=3)
    argv = ["--model", str(tmp_path / "model"), "--benchmarks", str(bench), "--k", "2"]
    argv += ["--max-new-tokens", "4", "--system-prompt", "none", "--pass-k", "1,2"]
    argv += ["--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    header = ["benchmark", "problems", "k", "avg@k", "pass@1", "pass@2"]
    assert out.splitlines()[0].split() == header
    assert len((tmp_path / "out/responses.jsonl").read_text().splitlines()) == 6


def test_answers_the_grader_times_out_on_are_counted_and_reported(tmp_path, tok, caplog):
    """A scored-0 answer that the grader never judged is counted in ``summary.json`` and warned
    of (a loaded machine once zeroed 64 correct answers of the miniature's evaluation unseen)."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from hpt_megatron.eval.benchmarks import load_benchmarks
    from hpt_megatron.eval.runner import evaluate_loaded

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    engine = HFGenerateEngine(LlamaForCausalLM(config).eval(), tok)
    [(bench, examples)] = load_benchmarks([str(_write_bench(tmp_path / "arith.jsonl"))])
    bench = dataclasses.replace(bench, reward="tests.unit.rewards.hostile_rewards:hang")
    options = EvalOptions(
        k=1, max_new_tokens=2, limit=2, grade_timeout_s=0.5, template=PromptTemplate()
    )
    with caplog.at_level("WARNING"):
        [result] = evaluate_loaded(engine, tok, [(bench, examples)], options=options,
                                   output_dir=tmp_path / "out")  # fmt: skip
    assert result.grading == {"timeouts": 2, "crashes": 0, "errors": 0}
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary[0]["grading"] == summary[-1]["grading"] == result.grading
    assert "arith: 2 of 2 answers timed out in the grader" in caplog.text
