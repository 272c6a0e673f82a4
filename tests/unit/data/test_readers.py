import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpt_megatron.data.readers import FieldMap, read_examples

EXPECTED_ROWS = {
    "luffy/valid.parquet": 2019,
    "luffy/valid.all.parquet": 6023,
    "luffy/valid.arc_c.parquet": 1172,
    "luffy/valid.gpqa.parquet": 198,
    "unify/AIME24.json": 30,
    "unify/AIME25.json": 30,
    "unify/AMC23.json": 40,
    "unify/MATH-500.json": 500,
    "unify/Minerva.json": 272,
    "unify/Olympiad-Bench.json": 674,
    "unify/GPQA.json": 198,
}


def test_every_shared_eval_file_reads_cleanly(shared_data):
    files = sorted(
        p.relative_to(shared_data / "eval").as_posix() for p in (shared_data / "eval").glob("*/*")
    )
    assert files == sorted(EXPECTED_ROWS)
    for name, rows in EXPECTED_ROWS.items():
        examples, report = read_examples(shared_data / "eval" / name, max_bad_share=0.0)
        assert (report.rows, len(report.bad), len(examples)) == (rows, 0, rows), name
        for ex in examples:
            assert ex.ground_truth and any(
                m["role"] == "user" and m["content"] for m in ex.messages
            )
        if name.startswith("luffy"):
            assert examples[0].messages[0]["role"] == "system"
            assert examples[0].data_source in {"aime", "math", "arc_c", "gpqa"}


def _verl_row(i, **overrides):
    row = {
        "data_source": "math",
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"q{i}"}],
        "reward_model": {"ground_truth": str(i), "style": "rule"},
        "target": [{"role": "assistant", "content": f"so \\boxed{{{i}}}"}],
    }
    row.update(overrides)
    return row


def test_broken_parquet_rows_are_reported_skipped_and_counted(tmp_path, caplog):
    rows = [_verl_row(i) for i in range(40)]
    rows[3]["prompt"] = []  # empty prompt
    rows[5]["prompt"] = [{"role": "user", "content": "  "}]  # empty user message
    rows[7]["reward_model"] = {"ground_truth": "", "style": "rule"}  # missing ground truth
    rows[9]["target"] = [{"role": "assistant", "content": None}]  # demonstration not text
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with caplog.at_level(logging.WARNING):
        examples, report = read_examples(path, max_bad_share=0.2)
    assert [b.row for b in report.bad] == [3, 5, 7, 9]
    assert "empty prompt" in report.bad[0].reason and "ground truth" in report.bad[2].reason
    assert "demonstration" in report.bad[3].reason
    assert len(examples) == 36 and examples[0].demonstration == "so \\boxed{0}"
    assert "train.parquet: row 3" in caplog.text
    with pytest.raises(ValueError, match=r"4 of 40 rows are bad .*max_bad_row_share"):
        read_examples(path, max_bad_share=0.05)


def test_broken_json_list_rows(tmp_path, shared_data):
    rows = json.loads((shared_data / "eval/unify/AIME24.json").read_text())
    rows[0] = {"answer": "1"}  # missing prompt
    rows[1] = {"prompt": "q"}  # missing ground truth
    rows[2] = "not a mapping"
    rows[3]["prompt"] = 12  # not text
    rows[4] = {"prompt": "z"}  # missing ground truth
    path = tmp_path / "AIME24.json"
    # an undecodable byte inside a string
    path.write_bytes(
        json.dumps(rows).replace('"q"', '"q\\u00e9"').encode().replace(b"\\u00e9", b"\xff")
    )
    examples, report = read_examples(path, max_bad_share=0.5)
    reasons = {b.row: b.reason for b in report.bad}
    assert set(reasons) == {0, 1, 2, 3, 4}
    assert "missing prompt" in reasons[0] and "undecodable" in reasons[1]
    assert "not a mapping" in reasons[2] and "neither text" in reasons[3]
    assert "missing ground truth" in reasons[4]
    assert len(examples) == 25


def test_jsonl_with_configurable_fields_and_bad_lines(tmp_path):
    lines = [json.dumps({"question": f"q{i}", "meta": {"sol": str(i)}}).encode() for i in range(20)]
    lines[4] = b'{"question": "broken'
    lines[6] = b'{"question": "caf\xe9", "meta": {"sol": "1"}}'  # latin-1, not UTF-8
    lines.insert(8, b"")  # blank lines are not rows
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    fields = FieldMap(prompt="question", answer="meta.sol")
    examples, report = read_examples(path, fields=fields, max_bad_share=0.2)
    assert [(b.row, b.reason.split(":")[0]) for b in report.bad] == [
        (4, "not valid JSON"),
        (6, "undecodable bytes at offset 17"),
    ]
    assert len(examples) == 18 and examples[0].ground_truth == "0"
    assert examples[0].data_source == "data" and examples[0].prompt_id == "data.jsonl:0"


def test_unreadable_files_name_the_file(tmp_path, shared_data):
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes((shared_data / "eval/luffy/valid.gpqa.parquet").read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.parquet: not a readable parquet file"):
        read_examples(truncated)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"prompt": "q", "answer": 1},')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON \(line 1"):
        read_examples(bad_json)
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"prompt": "q"}')
    with pytest.raises(ValueError, match="obj.json: expected a JSON list"):
        read_examples(not_list)
    with pytest.raises(ValueError, match="dataset file not found"):
        read_examples(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_examples(bad_json.rename(tmp_path / "bad.txt"))
    all_bad = tmp_path / "all_bad.jsonl"
    all_bad.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="no usable rows"):
        read_examples(all_bad)
