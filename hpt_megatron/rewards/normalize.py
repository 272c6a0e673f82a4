"""String normalisation of math answers (after the MATH benchmark's ``strip_string``, extended).

Two answers whose normal forms are equal are graded equal without any symbolic work; this is the
fast path that handles most correct answers.
"""

from __future__ import annotations

import re

_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_PERCENT = re.compile(r"\\?%")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SIMPLE_FRAC = re.compile(r"\\frac(\d)(\d)")
_HALF_BRACED_FRAC = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_SLASH_FRAC = re.compile(r"^(-?\d+)/(\d+)$")
_SQRT_BARE = re.compile(r"\\sqrt(\w)")
_LEADING_VAR = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(?!.*=)")
_TRAILING_ZEROS = re.compile(r"^(-?\d+)\.0+$")
_TRAILING_DECIMAL_ZEROS = re.compile(r"^(-?\d+\.\d*?)0+$")


def _unwrap_text(answer: str) -> str:
    previous = None
    while previous != answer:
        previous = answer
        answer = _TEXT_WRAPPERS.sub(r"\1", answer)
    return answer


def _canonical_number(answer: str) -> str:
    if _THOUSANDS.match(answer):
        answer = answer.replace(",", "")
    if answer.startswith("."):
        answer = "0" + answer
    elif answer.startswith("-."):
        answer = "-0" + answer[1:]
    answer = _TRAILING_ZEROS.sub(r"\1", answer)
    if "." in answer and re.fullmatch(r"-?\d+\.\d+", answer):
        answer = _TRAILING_DECIMAL_ZEROS.sub(r"\1", answer)
    return answer


def normalize_answer(answer: str) -> str:
    """Canonical string form of a math answer.

    Removes ``$``, ``\\left``/``\\right``, spacing commands, ``\\text{}`` wrappers, degree and
    percent signs, dollar signs, a trailing full stop and a leading ``x =``; rewrites ``\\dfrac``
    and ``\\tfrac`` as ``\\frac``, ``\\frac12`` as ``\\frac{1}{2}``, ``a/b`` of integers as
    ``\\frac{a}{b}``; drops thousands separators, leading-zero-less decimals and trailing zeros.

    Args:
        answer: The content of a box, or a ground truth.

    Returns:
        The normalised string; spaces are removed entirely.
    """
    text = answer.strip().replace("\n", "")
    text = text.replace("\\$", "").replace("$", "")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _unwrap_text(text)
    text = _SPACING.sub("", text)
    text = _DEGREES.sub("", text)
    text = _PERCENT.sub("", text)
    text = text.replace(" ", "").rstrip(".")
    text = _LEADING_VAR.sub("", text)
    text = _SQRT_BARE.sub(r"\\sqrt{\1}", text)
    text = _SIMPLE_FRAC.sub(r"\\frac{\1}{\2}", text)
    text = _HALF_BRACED_FRAC.sub(r"\\frac{\1}{\2}", text)
    slash = _SLASH_FRAC.match(text)
    if slash:
        text = f"\\frac{{{slash.group(1)}}}{{{slash.group(2)}}}"
    return _canonical_number(text)
