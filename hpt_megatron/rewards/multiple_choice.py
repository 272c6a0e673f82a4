"""Multiple-choice reward (GPQA ``ANSWER: X``, ARC-c letters)."""

from __future__ import annotations

import re

from hpt_megatron.rewards.extract import last_boxed

_ANSWER_LINE = re.compile(r"ANSWER\s*[:：]\s*\$?\s*\(?\s*([A-Z])\b", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*\$?\s*\(?\s*([A-Z])\b(?!['\w])")
_BOX_LETTER = re.compile(r"^\(?\s*(?:\\text\{\s*)?\(?([A-Z])\)?\s*\}?\)?(?:[\s.:)].*)?$", re.DOTALL)
_GOLD_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\.?$")


def extract_choice(response: str) -> str | None:
    """The chosen letter: the last ``ANSWER: X`` line, else the last box, else "answer is X".

    Args:
        response: The full model response.

    Returns:
        An upper-case letter, or None when the response commits to no option.
    """
    matches = _ANSWER_LINE.findall(response)
    if matches:
        return matches[-1].upper()
    boxed = last_boxed(response)
    if boxed is not None:
        match = _BOX_LETTER.match(boxed.strip())
        return match.group(1) if match else None
    matches = _ANSWER_IS.findall(response)
    return matches[-1] if matches else None


def multiple_choice_reward(response: str, ground_truth: str) -> float:
    """1.0 when the response's chosen letter equals the ground-truth letter, else 0.0.

    Args:
        response: The full model response.
        ground_truth: A letter such as ``'C'`` (``'(C)'`` and ``'\\boxed{C}'`` are accepted).
    """
    gold = last_boxed(ground_truth) or ground_truth
    gold_match = _GOLD_LETTER.match(gold.strip())
    if gold_match is None:
        return 0.0
    return 1.0 if extract_choice(response) == gold_match.group(1).upper() else 0.0
