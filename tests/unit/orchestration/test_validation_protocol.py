"""Validation as the official HPT code runs it: avg@k sampled at temperature 0.6, top-p 0.95,
scored per benchmark, the mean over benchmarks picking the best checkpoint.

Unify-Post-Training: exp_scripts/train.sh:73-75,88 (``val_temperature=0.6``, ``val_top_p=0.95``,
``n_val=8``, ``test_freq=10``); hpt/verl/verl/trainer/ppo/ray_trainer.py:455-496 repeats each
validation prompt ``n_val`` times and reports, per data source, the mean reward of all its
responses (``val/test_score/<source>``); mix_trainer.py:1242-1245 averages those over the sources
into ``avg_score`` and saves the best checkpoint by it (1274-1295). The closed forms below are
that arithmetic by hand.
"""

from __future__ import annotations

import pytest

from hpt_megatron.config import load_config
from hpt_megatron.data import build_arithmetic_tokenizer
from hpt_megatron.data.records import PromptRecord
from hpt_megatron.data.sample import Sample
from hpt_megatron.orchestration.driver import Driver, validation_metrics
from hpt_megatron.rollout.base import Generation, SamplingParams

BASE = ["model.inline={hidden_size: 8}"]
OFFICIAL = ["run.val_n=8", "run.val_temperature=0.6", "run.val_top_p=0.95"]


def _sample(source: str, correct: bool) -> Sample:
    return Sample(
        prompt_id="p",
        group_id=0,
        prompt_ids=[1],
        response_ids=[2],
        reward=float(correct),
        metadata={"data_source": source},
    )


def _official_avg_score(rewards_by_source: dict[str, list[float]]) -> float:
    """ray_trainer.py:487-496 then mix_trainer.py:1243."""
    test_scores = {k: sum(v) / len(v) for k, v in rewards_by_source.items()}
    return sum(test_scores.values()) / len(test_scores)


def test_source_mean_is_the_official_avg_score():
    # AIME24: 1 prompt x 8 responses, 2 right; MATH-500: 2 prompts x 8, 12 right.
    rewards = {"aime24": [1.0] * 2 + [0.0] * 6, "math500": [1.0] * 12 + [0.0] * 4}
    samples = [_sample(k, bool(r)) for k, v in rewards.items() for r in v]
    metrics = validation_metrics(samples, "source_mean")
    assert metrics["val/accuracy"] == pytest.approx(_official_avg_score(rewards))
    assert metrics["val/accuracy"] == pytest.approx((2 / 8 + 12 / 16) / 2)
    assert metrics["val/accuracy/aime24"] == 0.25 and metrics["val/accuracy/math500"] == 0.75
    pooled = validation_metrics(samples, "pooled")
    assert pooled["val/accuracy"] == pytest.approx(14 / 24)


class FakeEngine:
    """Answers every prompt with ``n`` responses: "1" for the first index + 1 of them, else "0"."""

    def __init__(self) -> None:
        self.params: list[SamplingParams] = []
        tok = build_arithmetic_tokenizer()
        self.right, self.wrong = (tok(t, add_special_tokens=False)["input_ids"] for t in "10")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        self.params.append(params)
        return [
            Generation(
                prompt_index=i,
                token_ids=self.right if j < i + 1 else self.wrong,
                logprobs=None,
                finish_reason="stop",
            )
            for i in range(len(prompts))
            for j in range(params.n)
        ]


class FakePool:
    def grade(self, texts: list[str], truths: list[str], fns: list[str]) -> list[float]:
        return [float(t == g) for t, g in zip(texts, truths)]


def _driver(overrides: list[str]) -> tuple[Driver, FakeEngine]:
    cfg = load_config(None, [*BASE, "run.val_every=10", *overrides])
    prompts = [
        PromptRecord(
            prompt_id=str(i),
            prompt_ids=[7, 8],
            prompt_text="q",
            ground_truth="1",
            data_source=source,
        )
        for i, source in enumerate(["aime24", "math500", "math500"])
    ]
    engine = FakeEngine()
    tok = build_arithmetic_tokenizer()
    return Driver(cfg, tok, None, prompts, engine, FakePool()), engine  # type: ignore[arg-type]


def test_the_official_protocol_samples_eight_at_06_and_095():
    driver, engine = _driver([*OFFICIAL, "run.val_score=source_mean"])
    metrics = driver.evaluate()
    (params,) = engine.params
    assert (params.n, params.temperature, params.top_p) == (8, 0.6, 0.95)
    assert params.seed is not None and params.seed != 0
    # prompt i: i + 1 of 8 right. aime24: prompt 0 (1/8); math500: prompts 1, 2 (2/8, 3/8)
    assert metrics["val/accuracy/aime24"] == pytest.approx(1 / 8)
    assert metrics["val/accuracy/math500"] == pytest.approx(5 / 16)
    assert metrics["val/accuracy"] == pytest.approx((1 / 8 + 5 / 16) / 2)
    assert driver.evaluate()["val/accuracy"] == metrics["val/accuracy"]
    assert engine.params[1].seed == params.seed  # the same draws at every validation


def test_the_default_stays_greedy_one_response_pooled():
    driver, engine = _driver([])
    metrics = driver.evaluate()
    (params,) = engine.params
    assert (params.n, params.temperature, params.seed) == (1, 0.0, 0)
    assert metrics["val/accuracy"] == pytest.approx(3 / 3)  # greedy: j = 0 < i + 1 is right


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.val_n=8"], "run.val_n: 8 greedy responses"),
        (["run.val_n=0"], "run.val_n: must be >= 1"),
        (["run.val_temperature=-1"], "run.val_temperature: must be >= 0"),
        (["run.val_top_p=0"], r"run.val_top_p: must be in \(0, 1\]"),
        (["run.val_score=best"], "run.val_score"),
    ],
)
def test_bad_validation_settings_are_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [*BASE, *overrides])
