import json
import time

import pytest

from hpt_megatron.rewards import math_reward
from hpt_megatron.rewards.extract import last_boxed, strip_box
from hpt_megatron.rewards.pool import RewardPool

GT_FILES = ["MATH-500.json", "Minerva.json", "Olympiad-Bench.json"]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=3.0) as p:
        yield p


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed 5$", "5"),
        ("no box", None),
        ("\\boxed{unbalanced", None),
        ("\\boxed{}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_strip_box():
    assert strip_box("\\boxed{204}") == "204"
    assert strip_box("\\frac{1}{2}") == "\\frac{1}{2}"


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("  3 ", "3"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("30^\\circ", "30"),
        ("30", "30^{\\circ}"),
        ("50\\%", "50"),
        ("x = 5", "5"),
        ("\\text{(C)}", "(C)"),
        ("32348", "\\$32,\\!348"),
        ("1.24 \\times 10^{-8}", "1.24e-8"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("x^2+2x+1", "(x+1)^2"),
        ("[0,1)", "\\left[0, 1\\right)"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
        ("-2,1", "1,-2"),
        ("\\boxed{204}", "\\boxed{204}"),
    ],
)
def test_equivalent_rewritings_score_one(pred, gold):
    assert math_reward(f"The answer is \\boxed{{{pred}}}", gold) == 1.0


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("\\boxed{3}", "2"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("\\boxed{x^2+1}", "(x+1)^2"),
        ("the answer is 5", "5"),
        ("5, so 5 is the answer. \\boxed{6}", "5"),
        ("\\boxed{5} no wait, it is \\boxed{6}", "5"),
        ("5 \\boxed{}", "5"),
        ("\\boxed{(3,4)}", "(3,5)"),
    ],
)
def test_wrong_or_unboxed_scores_zero(response, gold):
    assert math_reward(response, gold) == 0.0


def test_every_shared_ground_truth_grades_one(shared_data, pool):
    answers = []
    for name in GT_FILES:
        rows = json.loads((shared_data / "eval/unify" / name).read_text())
        answers += [row["answer"] for row in rows]
    assert len(answers) == 500 + 272 + 674
    scores = pool.grade([f"Therefore ... \\boxed{{{a}}}" for a in answers], answers)
    failed = [a for a, s in zip(answers, scores) if s != 1.0]
    assert not failed


HOSTILE = [
    "\\boxed{" + "{" * 50_000 + "5" + "}" * 50_000 + "}",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10^{10^{10}}-1}",
    "x" * 100_000 + "\\boxed{6}",
    "\\boxed{" + "}" * 1000 + "{" * 1000,
    "\\boxed{{{{{{{{{5",
    "\\boxed{5\x00}",
    "\x00" * 1000,
    "\\boxed{" + "(" * 5000 + ")" * 5000 + "}",
    "\\boxed{99999999!}",
]


def test_hostile_inputs_score_zero_within_the_timeout(pool):
    start = time.monotonic()
    scores = pool.grade(HOSTILE, ["5"] * len(HOSTILE))
    assert scores == [0.0] * len(HOSTILE)
    assert time.monotonic() - start < pool.timeout_s * len(HOSTILE) / pool.num_workers + 2


@pytest.mark.parametrize("response", HOSTILE)
def test_hostile_inputs_are_cheap_even_in_process(response):
    start = time.monotonic()
    assert math_reward(response, "5") == 0.0
    assert time.monotonic() - start < 1.0
