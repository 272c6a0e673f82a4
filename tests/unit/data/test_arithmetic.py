import pytest
from transformers import AutoTokenizer

from hpt_megatron.config.data import DataConfig
from hpt_megatron.data import (
    arithmetic_problems,
    build_arithmetic_dataset,
    build_arithmetic_tokenizer,
    build_prompt_dataset,
)
from hpt_megatron.rewards import math_reward


def test_splits_are_fixed_and_disjoint():
    for level in (1, 2, 3, 5):
        train = arithmetic_problems(level, "train", seed=0, train_size=300, test_size=50)
        test = arithmetic_problems(level, "test", seed=0, train_size=300, test_size=50)
        assert not set(train) & set(test)
        assert train == arithmetic_problems(level, "train", seed=0, train_size=300, test_size=50)
        assert train != arithmetic_problems(level, "train", seed=1, train_size=300, test_size=50)
    assert len(arithmetic_problems(1, "test")) == 200
    assert len(arithmetic_problems(1, "train")) == 5000
    assert len(arithmetic_problems(1, "train", train_size=10**5)) == 8100 - 200


def test_level_one_is_two_digit_addition_composed_from_seen_column_facts():
    train = arithmetic_problems(1, "train")
    test = arithmetic_problems(1, "test")
    assert {p.op for p in train + test} == {"+"}
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 for p in train + test)

    def column_facts(problem):
        units = (problem.a % 10, problem.b % 10, 0)
        carry = int(sum(units) >= 10)
        return {units, (problem.a // 10, problem.b // 10, carry)}

    seen = set().union(*map(column_facts, train))
    # Held-out problems are new combinations of facts that training demonstrates.
    assert set().union(*map(column_facts, test)) <= seen
    # Mixed with level 2, no test problem of either level is a train problem of the other.
    kw = {"train_size": 3000, "test_size": 300}
    one = [set(arithmetic_problems(1, split, **kw)) for split in ("train", "test")]
    two = [set(arithmetic_problems(2, split, **kw)) for split in ("train", "test")]
    assert not (one[0] | two[0]) & (one[1] | two[1])
    with pytest.raises(ValueError, match="test_size"):
        arithmetic_problems(1, "test", test_size=8100)


def test_demonstrations_are_correct_and_grade_one():
    for level in (1, 2, 3, 4, 5):
        for problem in arithmetic_problems(level, "train", train_size=200):
            demo = problem.demonstration()
            assert demo.endswith(f"\\boxed{{{problem.answer}}}")
            assert math_reward(demo, str(problem.answer)) == 1.0
            assert problem.answer >= 0


def test_worked_examples():
    from hpt_megatron.data.arithmetic import ArithmeticProblem

    assert ArithmeticProblem(47, "+", 38).demonstration() == "7+8=15\n4+3+1=8\n\\boxed{85}"
    assert ArithmeticProblem(83, "-", 47).demonstration() == "13-7=6\n8-1-4=3\n\\boxed{36}"
    assert ArithmeticProblem(47, "*", 8).demonstration() == "7*8=56\n4*8+5=37\n\\boxed{376}"
    assert ArithmeticProblem(47, "*", 38).demonstration() == (
        "47*8=376\n47*30=1410\n376+1410=1786\n\\boxed{1786}"
    )


def test_tokenizer_round_trips_and_saves(tmp_path):
    tok = build_arithmetic_tokenizer(tmp_path / "tok")
    text = "12*3=36\n\\boxed{36}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) == len(text) - len("\\boxed") + 1
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert (
        loaded.apply_chat_template(
            [{"role": "user", "content": "1+1=?"}], tokenize=False, add_generation_prompt=True
        )
        == "<|bos|><|user|>1+1=?<|assistant|>"
    )
    assert len(tok) < 128


def test_easy_levels_are_short():
    tok = build_arithmetic_tokenizer()
    for level, limit in ((1, 36), (2, 48), (3, 64)):
        ds = build_arithmetic_dataset(tok, "train", [level], train_size=500)
        assert max(len(r.prompt_ids) + len(r.demo_ids) for r in ds) <= limit


def test_config_builds_train_and_val():
    tok = build_arithmetic_tokenizer()
    cfg = DataConfig(val="arithmetic")
    cfg.arithmetic.levels = [1, 2]
    cfg.arithmetic.train_size = 100
    train, val = build_prompt_dataset(cfg, tok, "train"), build_prompt_dataset(cfg, tok, "val")
    assert len(train) == 100 + 100 and len(val) == 200 + 200
    assert {r.data_source for r in train} == {"arithmetic_l1", "arithmetic_l2"}
    assert len({r.prompt_id for r in train}) == len(train)
    assert not {r.prompt_text for r in train} & {r.prompt_text for r in val}
