"""A real SGLang server on CPU serving a tiny random Qwen2 model (needs tools/sglang_env.sh).

One server is shared by the module (startup takes about a minute on 2 cores); tests run in file
order: generation and log-prob parity first, then a weight update, then a crash and restart.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.sglang import ServerStartError, SGLangEngine
from tests.helpers.sglang_cpu import server_config
from tests.helpers.tiny_hf import build_tiny_model, greedy_tokens, teacher_forced_logprobs

pytestmark = pytest.mark.sglang

PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12], [40, 41, 42]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen2")
    build_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def engine(sglang_python: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("run")
    eng = SGLangEngine.launch(server_config(), model_path=model_dir, run_dir=run_dir)
    yield eng
    eng.shutdown()
    assert not any(s.is_alive() for s in eng.servers)


def _hf(model_dir: Path, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if seed == 0:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return build_tiny_model(seed=seed)


def test_greedy_generation_matches_hf(engine: SGLangEngine, model_dir: Path) -> None:
    model = _hf(model_dir)
    gens = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    assert [g.prompt_index for g in gens] == list(range(len(PROMPTS)))
    for prompt, gen in zip(PROMPTS, gens):
        assert gen.token_ids == greedy_tokens(model, prompt, 12)[: len(gen.token_ids)]
        assert gen.finish_reason in ("stop", "length") and gen.weight_version == 0


def test_logprobs_equal_hf_teacher_forced(engine: SGLangEngine, model_dir: Path) -> None:
    model = _hf(model_dir)
    gens = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=1))
    assert [g.prompt_index for g in gens] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    assert len({tuple(g.token_ids) for g in gens}) > len(PROMPTS)  # samples differ
    for gen in gens:
        ref = teacher_forced_logprobs(model, PROMPTS[gen.prompt_index], gen.token_ids)
        torch.testing.assert_close(torch.tensor(gen.logprobs), ref, atol=1e-4, rtol=0)


def test_scores_of_given_tokens_equal_hf(engine: SGLangEngine, model_dir: Path) -> None:
    """The servers as a distillation teacher (``rollout/sglang/scoring.py``): one batched
    request with no new tokens scores given responses like HF, teacher-forced."""
    model = _hf(model_dir)
    responses = [[9, 10, 11], [300, 2, 2, 7, 1], [5], list(range(60, 80))]
    got = engine.score(PROMPTS, responses)
    for prompt, response, logprobs in zip(PROMPTS, responses, got):
        ref = teacher_forced_logprobs(model, prompt, response)
        torch.testing.assert_close(torch.tensor(logprobs), ref, atol=1e-4, rtol=0)


def test_update_weights_from_export_buckets(engine: SGLangEngine, model_dir: Path) -> None:
    new = _hf(model_dir, seed=7)
    state = list(new.state_dict().items())
    engine.update_weights([state[:5], state[5:]], version=3)  # two buckets, as the export gives
    gens = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    for prompt, gen in zip(PROMPTS, gens):
        assert gen.token_ids == greedy_tokens(new, prompt, 10)[: len(gen.token_ids)]
        assert gen.weight_version == 3


def test_update_weights_from_disk_folder(engine: SGLangEngine, tmp_path: Path) -> None:
    new = build_tiny_model(tmp_path, seed=11, with_tokenizer=False)
    engine.update_weights_from_disk(tmp_path, version=4)
    gens = engine.generate(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=8))
    for prompt, gen in zip(PROMPTS, gens):
        assert gen.token_ids == greedy_tokens(new, prompt, 8)[: len(gen.token_ids)]
        assert gen.weight_version == 4


def test_killed_server_is_restarted_with_current_weights(engine: SGLangEngine) -> None:
    server = engine.servers[0]
    new = build_tiny_model(seed=13)
    engine.update_weights([list(new.state_dict().items())], version=5)
    killed = server.proc
    os.killpg(killed.pid, signal.SIGKILL)
    # Reaped when it has gone (a large process can take seconds to exit on a loaded machine).
    assert killed.wait(timeout=120) == -signal.SIGKILL and not server.is_alive()
    gens = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    assert server.restarts == 1 and server.is_alive() and engine.health()
    for prompt, gen in zip(PROMPTS, gens):  # the restarted server was re-synced
        assert gen.token_ids == greedy_tokens(new, prompt, 8)[: len(gen.token_ids)]


def test_bad_model_path_gives_clear_error(sglang_python: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        SGLangEngine.launch(server_config(), model_path=tmp_path / "missing", run_dir=tmp_path)
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(ServerStartError, match="exited with code") as err:
        SGLangEngine.launch(server_config(), model_path=empty, run_dir=tmp_path)
    assert "log" in str(err.value) and str(empty) in str(err.value)


def test_missing_environment_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ServerStartError, match="sglang_env.sh"):
        SGLangEngine.launch(
            server_config(python=str(tmp_path / "nope/bin/python")),
            model_path=model_dir,
            run_dir=tmp_path,
        )
