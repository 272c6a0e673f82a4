"""The math reward: last box, then normalised string match, sympy equivalence and math-verify.

``math_reward`` runs in the calling process. Its symbolic stages are guarded against inputs that
make sympy explode (power towers, huge exponents, very long expressions), and math-verify's own
signal-based timeouts are used only on the main thread (signals fail elsewhere). The hard bound on
time and memory comes from grading in :class:`hpt_megatron.rewards.pool.RewardPool`.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from typing import Any

import sympy

from hpt_megatron.rewards.extract import last_boxed, strip_box
from hpt_megatron.rewards.normalize import normalize_answer

MAX_SYMBOLIC_CHARS = 300  # longer answers are only string-matched
_SCI = re.compile(r"^(-?\d+(?:\.\d+)?)(?:e|E|\\times10\^\{?|\*10\^\{?|\\cdot10\^\{?)([-+]?\d+)\}?$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")
_FRAC_NUM = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(\d+)\}$")
# a power whose exponent itself holds a power, or an exponent of 6+ digits
_EXPLOSIVE = re.compile(r"\^\s*\{[^}]*\^|\^\s*\(?[^\s]*\^|\^\s*\{?\s*\d{6,}|\d{4,}\s*!|!\s*!")


def _as_number(text: str) -> float | None:
    """A plain decimal, scientific-notation number or integer fraction as a float."""
    if _NUMBER.match(text):
        return float(text)
    sci = _SCI.match(text)
    if sci:
        return float(sci.group(1)) * 10.0 ** int(sci.group(2))
    frac = _FRAC_NUM.match(text)
    if frac and int(frac.group(3)) != 0:
        value = int(frac.group(2)) / int(frac.group(3))
        return -value if frac.group(1) else value
    return None


def _numbers_match(pred: str, gold: str) -> bool | None:
    """True/False when both sides are plain numbers, None when either is not."""
    a, b = _as_number(pred), _as_number(gold)
    if a is None or b is None:
        return None
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _is_explosive(text: str) -> bool:
    return len(text) > MAX_SYMBOLIC_CHARS or bool(_EXPLOSIVE.search(text))


@functools.lru_cache(maxsize=8192)
def _parse(answer: str) -> tuple[Any, ...]:
    """math-verify's LaTeX parse of ``\\boxed{answer}`` (cached: rollouts share ground truths)."""
    from math_verify import parse

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout))
    except Exception:  # unparseable is "no expression"
        return ()


def _sympy_equal(pred: tuple[Any, ...], gold: tuple[Any, ...]) -> bool:
    """Symbolic equivalence of the first parsed expressions via ``sympy.simplify``."""
    a, b = pred[0], gold[0]
    if not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return False
    if a.free_symbols != b.free_symbols:
        return False
    try:
        return bool(sympy.simplify(a - b) == 0)
    except Exception:  # sympy failing means "not shown equal"
        return False


def _math_verify_equal(pred: tuple[Any, ...], gold: tuple[Any, ...]) -> bool:
    from math_verify import verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(list(gold), list(pred), timeout_seconds=timeout))
    except Exception:  # math-verify raising means "not verified"
        return False


def answers_match(pred: str, gold: str) -> bool:
    """Whether two extracted answers are equivalent (string, then sympy, then math-verify).

    Args:
        pred: The model's answer (the content of its last box).
        gold: The ground truth, with or without a surrounding box.
    """
    if "\x00" in pred:
        return False
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(strip_box(gold))
    if not pred_norm:
        return False
    if pred_norm == gold_norm:
        return True
    numeric = _numbers_match(pred_norm, gold_norm)
    if numeric is not None:
        return numeric
    if _is_explosive(pred_norm) or _is_explosive(gold_norm):
        return False
    pred_parsed, gold_parsed = _parse(pred.strip()), _parse(strip_box(gold))
    if not pred_parsed or not gold_parsed:
        return False
    return _sympy_equal(pred_parsed, gold_parsed) or _math_verify_equal(pred_parsed, gold_parsed)


def math_reward(response: str, ground_truth: str) -> float:
    """Binary math reward of one response.

    Args:
        response: The full model response; only its last ``\\boxed{}``/``\\fbox{}`` counts.
        ground_truth: The reference answer (``'\\frac{1}{2}'`` or ``'\\boxed{204}'``).

    Returns:
        1.0 when the last box holds an answer equivalent to the ground truth, else 0.0 (no box
        scores 0).
    """
    pred = last_boxed(response)
    if pred is None:
        return 0.0
    return 1.0 if answers_match(pred, ground_truth) else 0.0
