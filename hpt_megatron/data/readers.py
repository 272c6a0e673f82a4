"""Readers for the verl/LUFFY parquet schema, JSON lists and JSONL.

Every reader yields :class:`RawExample` rows. A bad row (missing or empty prompt, missing ground
truth, a demonstration that is not text, undecodable bytes, a JSONL line that is not JSON) is
reported with file, row and reason, skipped and counted; reading fails with a ``ValueError`` only
when the share of bad rows exceeds ``max_bad_share``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hpt_megatron.data.records import BadRow, RawExample, ReadReport

logger = logging.getLogger(__name__)

Format = Literal["auto", "parquet", "json", "jsonl"]
_ANSWER_KEYS = ("reward_model.ground_truth", "answer", "ground_truth")
_MISSING = object()


@dataclass(kw_only=True)
class FieldMap:
    """Where a row keeps each field; dotted names reach into nested mappings.

    ``answer=None`` tries ``reward_model.ground_truth`` (verl/LUFFY), then ``answer``, then
    ``ground_truth``.
    """

    prompt: str = "prompt"
    answer: str | None = None
    demonstration: str = "target"
    data_source: str = "data_source"


class BadRowError(ValueError):
    """Raised for one row; the reader turns it into a :class:`BadRow`."""


def _get(row: dict[str, Any], dotted: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _text(value: Any, what: str) -> str:
    """A field as text; bytes must be UTF-8 and strings must hold no undecodable bytes."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRowError(f"{what}: undecodable bytes") from None
    if not isinstance(value, str):
        raise BadRowError(f"{what} is not text ({type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from surrogateescape decoding
        raise BadRowError(f"{what}: undecodable bytes") from None
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if value is _MISSING or value is None:
        raise BadRowError("missing prompt")
    if isinstance(value, (str, bytes)):
        text = _text(value, "prompt")
        if not text.strip():
            raise BadRowError("empty prompt")
        return [{"role": "user", "content": text}]
    if not isinstance(value, (list, tuple)):
        raise BadRowError("prompt is neither text nor a list of chat messages")
    if not value:
        raise BadRowError("empty prompt (no messages)")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRowError(f"prompt message {i} is not a {{role, content}} mapping")
        role = _text(message["role"], f"prompt message {i} role")
        messages.append({"role": role, "content": _text(message["content"], f"prompt message {i}")})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise BadRowError("empty prompt (no user message with content)")
    return messages


def _demonstration(value: Any) -> str | None:
    if value is _MISSING or value is None:
        return None
    if isinstance(value, (list, tuple)):
        # verl/LUFFY: a list holding one {"role": "assistant", "content": ...}
        contents = [m.get("content") for m in value if isinstance(m, dict)]
        if len(contents) != len(value) or not contents:
            raise BadRowError("demonstration is not text or a list of assistant messages")
        value = contents[-1]
    text = _text(value, "demonstration")
    return text if text.strip() else None


def _ground_truth(row: dict[str, Any], key: str | None) -> str:
    keys = (key,) if key else _ANSWER_KEYS
    for name in keys:
        value = _get(row, name)
        if value is _MISSING or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, bytes, int, float)):
            raise BadRowError(f"ground truth '{name}' is not text ({type(value).__name__})")
        text = _text(value, "ground truth") if isinstance(value, (str, bytes)) else str(value)
        if text.strip():
            return text.strip()
    raise BadRowError(f"missing ground truth (looked for {', '.join(keys)})")


def parse_row(row: Any, fields: FieldMap, file: str, index: int) -> RawExample:
    """Validate one row into a :class:`RawExample` or raise :class:`BadRowError`."""
    if not isinstance(row, dict):
        raise BadRowError(f"row is a {type(row).__name__}, not a mapping")
    messages = _messages(_get(row, fields.prompt))
    ground_truth = _ground_truth(row, fields.answer)
    demonstration = _demonstration(_get(row, fields.demonstration))
    source = _get(row, fields.data_source)
    data_source = source if isinstance(source, str) and source else Path(file).stem
    return RawExample(
        messages=messages,
        ground_truth=ground_truth,
        demonstration=demonstration,
        data_source=data_source,
        source=Path(file).name,
        row=index,
    )


def _rows_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise ValueError(f"{path}: not valid JSON ({where}): {err.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    yield from enumerate(data)


def _rows_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as fh:
        for index, raw in enumerate(fh):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield index, BadRowError(f"undecodable bytes at offset {err.start}")
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as err:
                yield index, BadRowError(f"not valid JSON: {err.msg} at column {err.colno}")


def _rows_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise ValueError(f"{path}: not a readable parquet file: {err}") from None
    yield from enumerate(table.to_pylist())


def detect_format(path: Path) -> Literal["parquet", "json", "jsonl"]:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    raise ValueError(f"{path}: cannot tell the format from the suffix; set data.format")


def read_examples(
    path: str | Path,
    *,
    fields: FieldMap | None = None,
    fmt: Format = "auto",
    max_bad_share: float = 0.05,
) -> tuple[list[RawExample], ReadReport]:
    """Read and validate every row of a dataset file.

    Args:
        path: A ``.parquet``, ``.json`` (a list of rows) or ``.jsonl`` file.
        fields: Where the fields live; the default fits verl/LUFFY parquet and ``{prompt, answer}``.
        fmt: The file format, or ``"auto"`` to go by the suffix.
        max_bad_share: The largest share of bad rows that is tolerated.

    Returns:
        The good rows and a report of every bad one.

    Raises:
        ValueError: naming the file when it is missing or unreadable, has no good rows, or has
            more than ``max_bad_share`` bad rows.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file not found: {path}")
    fields = fields or FieldMap()
    kind = detect_format(path) if fmt == "auto" else fmt
    rows = {"parquet": _rows_parquet, "json": _rows_json, "jsonl": _rows_jsonl}[kind](path)
    report = ReadReport(file=str(path))
    examples = []
    columns: dict[str, None] = {}  # the rows' top-level keys, in order of appearance
    for index, row in rows:
        report.rows += 1
        if isinstance(row, dict):
            columns.update(dict.fromkeys(row))
        try:
            if isinstance(row, BadRowError):
                raise row
            examples.append(parse_row(row, fields, str(path), index))
        except BadRowError as err:
            report.bad.append(BadRow(str(path), index, str(err)))
    _check_fields(report, fields, list(columns), max_bad_share)
    _check_report(report, max_bad_share)
    return examples, report


def _check_fields(
    report: ReadReport, fields: FieldMap, columns: list[str], max_bad_share: float
) -> None:
    """A prompt or answer field missing from too many rows is a renamed or mistyped column: one
    message listing the file's columns, instead of a warning per row."""
    answer = fields.answer or ", ".join(_ANSWER_KEYS)
    for reason, what in (
        ("missing prompt", f"prompt field '{fields.prompt}' (data.prompt_key)"),
        ("missing ground truth", f"answer field ({answer}: data.answer_key)"),
    ):
        missing = sum(b.reason.startswith(reason) for b in report.bad)
        if missing and (missing == report.rows or missing / report.rows > max_bad_share):
            raise ValueError(
                f"{report.file}: {missing} of {report.rows} rows have no {what}; the file's "
                f"columns: {', '.join(columns) or 'none'}"
            )


def _check_report(report: ReadReport, max_bad_share: float) -> None:
    for bad in report.bad[:10]:
        logger.warning("skipping %s", bad)
    if len(report.bad) > 10:
        logger.warning("... and %d more bad rows in %s", len(report.bad) - 10, report.file)
    if report.good == 0:
        reasons = "; ".join(str(b) for b in report.bad[:3])
        raise ValueError(f"{report.file}: no usable rows out of {report.rows}. {reasons}")
    share = len(report.bad) / report.rows
    if share > max_bad_share:
        reasons = "; ".join(str(b) for b in report.bad[:3])
        raise ValueError(
            f"{report.file}: {len(report.bad)} of {report.rows} rows are bad ({share:.1%} > "
            f"data.max_bad_row_share {max_bad_share:.1%}). First: {reasons}"
        )
