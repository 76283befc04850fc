import json

import pytest

from chinese_vicuna.data.datasets import DataError, iter_records, load_conversations, parse_source
from chinese_vicuna.data.formats import RecordError, to_conversation


def roles(conv):
    return [(m.role, m.content) for m in conv.messages]


def test_each_format_to_conversation():
    a = to_conversation({"instruction": "问", "input": "上下文", "output": "答"}, "auto", "f:1")
    assert roles(a) == [("user", "问"), ("assistant", "答")] and a.messages[0].context == "上下文"
    v = to_conversation({"input": ["q1", "q2"], "output": ["a1", "a2"]}, "auto", "f:1")
    assert roles(v) == [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    s = to_conversation(
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "auto",
        "f:1",
    )
    assert roles(s) == [("system", "S"), ("user", "q"), ("assistant", "a")]
    o = to_conversation({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "auto", "f:1")
    assert roles(o) == [("user", "q"), ("assistant", "a")]
    t = to_conversation({"text": "一段文字"}, "auto", "f:1")
    assert roles(t) == [("text", "一段文字")]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "q"}, "f:3: output: missing; expected a string"),
        ({"instruction": 5, "output": "a"}, "f:3: instruction: expected a string, got int"),
        ({"input": ["a", "b"], "output": ["x"]}, "f:3: input/output: expected lists of equal length, got 2 inputs and 1 outputs"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "f:3: conversations[0].from: expected one of"),
        ({"messages": [{"role": "user", "content": "q"}]}, "f:3: messages: expected the conversation to end with an assistant reply"),
        ({"foo": 1}, "f:3: record: expected keys of a known format"),
        ([1, 2], "f:3: record: expected a JSON object, got list"),
    ],
)
def test_bad_records_name_file_line_field(record, message):
    with pytest.raises(RecordError) as e:
        to_conversation(record, "auto", "f:3")
    assert str(e.value).startswith(message)


def test_invalid_json_line_reported(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        list(iter_records(str(p)))


def test_non_utf8_reported_with_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n' + '{"instruction": "中"}\n'.encode("gbk"))
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        list(iter_records(str(p)))


def test_empty_and_missing_files(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl:1: empty file"):
        list(iter_records(str(p)))
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        list(iter_records(str(tmp_path / "nope.jsonl")))


def test_json_array_reports_element_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:3: output: missing"):
        load_conversations([parse_source(str(p))])


def test_skip_mode_counts_and_keeps_rejects(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"input": ["x"], "output": []}]
    p.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    res = load_conversations([parse_source(str(p))], on_bad_record="skip")
    assert len(res.conversations) == 1
    assert [r["where"] for r in res.rejects] == [f"{p}:2", f"{p}:3"]


def test_parquet_and_txt_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "q", "input": "", "output": "a"}]), tmp_path / "d.parquet")
    res = load_conversations([parse_source(str(tmp_path / "d.parquet"))])
    assert roles(res.conversations[0]) == [("user", "q"), ("assistant", "a")]
    (tmp_path / "t.txt").write_text("第一段。\n\n第二段，\n续行。\n", encoding="utf-8")
    recs = list(iter_records(str(tmp_path / "t.txt")))
    assert [r for _, r in recs] == [{"text": "第一段。"}, {"text": "第二段，\n续行。"}]
    assert [w.rsplit(":", 1)[1] for w, _ in recs] == ["1", "3"]


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="Offline\\? Pass a local path"):
        list(iter_records("someone/some-dataset"))
