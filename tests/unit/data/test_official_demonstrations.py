"""Over-long demonstrations are cut as the official HPT/LUFFY code cuts them.

Unify-Post-Training: the dataset tokenises the demonstration without special tokens and cuts
it to ``max_prefix_len`` tokens (hpt/verl/verl/mix_src/rl_dataset_with_target.py:140,147-157;
8192 in exp_scripts/train.sh:77); the rollout appends EOS to it (mix_vllm_rollout.py:163-166)
and cuts the response to ``response_length = data.max_response_length`` (line 288). So with
both at the budget L, a demonstration of d tokens trains on ``(demo + [EOS])[:L]``: whole with
EOS when d < L, its first L tokens without EOS otherwise. Prompts over ``max_prompt_length``
are dropped (``filter_prompts``, hpt/verl/verl/utils/dataset/rl_dataset.py:151-159). A leading
``<think>\\n`` of the demonstration is dropped when the prompt ends with one
(rl_dataset_with_target.py:138-139).
"""

from __future__ import annotations

import pytest

from hpt_megatron.config import load_config
from hpt_megatron.data import (
    PromptTemplate,
    RawExample,
    TokenizeOptions,
    build_arithmetic_tokenizer,
    tokenize_examples,
)
from hpt_megatron.data.dataset import demonstration_text


def _official_demo(demo_ids: list[int], eos: int, max_prefix_len: int, response_length: int):
    """rl_dataset_with_target.py:147-157 then mix_vllm_rollout.py:163-166,288."""
    cut = demo_ids[:max_prefix_len]
    with_eos = [*cut, eos] if cut else cut
    return with_eos[:response_length]


def _example(question: str, demo: str) -> RawExample:
    messages = [{"role": "user", "content": question}]
    return RawExample(messages=messages, ground_truth="3", demonstration=demo, source="f", row=0)


@pytest.fixture(scope="module")
def tok():
    return build_arithmetic_tokenizer()


@pytest.mark.parametrize("budget", [3, 7, 8, 9, 12])
def test_demonstrations_are_cut_as_officially(tok, budget):
    demo = "1+2=3 ok"
    ids = tok([demo], add_special_tokens=False)["input_ids"][0]
    assert len(ids) == 8  # budgets below, at and above the demonstration's length
    options = TokenizeOptions(max_response_tokens=budget, overlong="truncate_demos")
    template = PromptTemplate(kind="raw", system_prompt=None)
    ds = tokenize_examples([_example("1+2=?", demo)], tok, template=template, options=options)
    assert ds[0].demo_ids == _official_demo(ids, tok.eos_token_id, budget, budget)
    assert ds.stats.demos_truncated == int(len(ids) + 1 > budget)


def test_over_long_prompts_are_dropped_not_cut(tok):
    options = TokenizeOptions(max_prompt_tokens=5, overlong="truncate_demos")
    template = PromptTemplate(kind="raw", system_prompt=None)
    examples = [_example("1+2=?", "3"), _example("11+22+33+44=?", "110")]
    ds = tokenize_examples(examples, tok, template=template, options=options)
    assert [r.prompt_text for r in ds] == ["1+2=?"]
    assert ds.stats.overlong_filtered == 1 and ds.stats.prompts_truncated == 0


def test_filter_stays_an_option(tok):
    options = TokenizeOptions(max_response_tokens=3, overlong="filter")
    template = PromptTemplate(kind="raw", system_prompt=None)
    examples = [_example("1+2=?", "3"), _example("1+3=?", "1+3=4 ok")]
    ds = tokenize_examples(examples, tok, template=template, options=options)
    assert [r.prompt_text for r in ds] == ["1+2=?"]


def test_a_leading_think_is_dropped_only_after_a_think_prompt():
    assert demonstration_text("<think>\nstep</think>", "User: q\n<think>\n") == "step</think>"
    assert demonstration_text("<think>\nstep</think>", "User: q\n") == "<think>\nstep</think>"
    assert demonstration_text("step", "User: q\n<think>\n") == "step"


def test_the_config_accepts_the_mode_and_rejects_others():
    base = ["model.inline={hidden_size: 8}"]
    assert load_config(None, [*base, "data.overlong=truncate_demos"]).data.overlong == (
        "truncate_demos"
    )
    with pytest.raises(ValueError, match="data.overlong"):
        load_config(None, [*base, "data.overlong=cut"])
