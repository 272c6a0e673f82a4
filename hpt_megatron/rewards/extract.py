"""Answer extraction: the last ``\\boxed{...}`` / ``\\fbox{...}`` of a response.

The scan is linear in the length of the text and never recurses, so hostile inputs (unbalanced or
deeply nested braces, very long responses) cost time proportional to their size and nothing more.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# ``\boxed 5`` (no braces) is valid LaTeX for a one-token argument.
_BARE_ARG = re.compile(r"\s+([^\s$]+)")


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == '{'``, or None when unbalanced."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        char = text[i]
        if char == "\\" and i + 1 < n and text[i + 1] in "{}":
            i += 2  # an escaped brace is a literal, not grouping
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def _last_command(text: str) -> tuple[int, str] | None:
    """Position and name of the last box command in ``text``."""
    best: tuple[int, str] | None = None
    for command in _BOX_COMMANDS:
        pos = text.rfind(command)
        while pos != -1:
            end = pos + len(command)
            # ``\boxedx`` is a different macro; accept only a non-letter after the name
            if end >= len(text) or not text[end].isalpha():
                break
            pos = text.rfind(command, 0, pos)
        if pos != -1 and (best is None or pos > best[0]):
            best = (pos, command)
    return best


def last_boxed(text: str) -> str | None:
    """The argument of the last ``\\boxed``/``\\fbox`` in ``text``.

    Args:
        text: A model response (or a ground truth written as ``\\boxed{...}``).

    Returns:
        The box's content, stripped, or None when there is no box or the last one is unbalanced
        or empty.
    """
    found = _last_command(text)
    if found is None:
        return None
    pos, command = found
    after = pos + len(command)
    rest = text[after:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _balanced_group(text, after + len(rest) - len(stripped))
    else:
        match = _BARE_ARG.match(rest)
        content = match.group(1) if match else None
    if content is None or not content.strip():
        return None
    return content.strip()


def strip_box(answer: str) -> str:
    """A ground truth without a surrounding box: ``'\\boxed{204}'`` -> ``'204'``."""
    inner = last_boxed(answer)
    if inner is not None and answer.strip().startswith(("\\boxed", "\\fbox")):
        return inner
    return answer.strip()
