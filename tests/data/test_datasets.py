import pytest
from helpers import SAMPLES, write_jsonl

from chinese_vicuna.data.datasets import (
    DataError,
    group_text_blocks,
    load_conversations,
    parse_source,
    prepare,
    split,
)
from chinese_vicuna.data.templates import get_template
from chinese_vicuna.data.tokenize import Renderer


def rows(n, tag):
    return [{"instruction": f"{tag}{i}", "output": f"答{i}"} for i in range(n)]


def test_parse_source_weights():
    assert parse_source("a.jsonl*0.5").weight == 0.5
    assert parse_source("a.jsonl").weight == 1.0
    s = parse_source({"path": "b.json", "weight": 2, "format": "alpaca"})
    assert (s.path, s.weight, s.format) == ("b.json", 2.0, "alpaca")


def test_mix_with_weights_and_dedup(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows(10, "a") + rows(2, "a"))  # 2 duplicates
    b = write_jsonl(tmp_path / "b.jsonl", rows(10, "b"))
    res = load_conversations([parse_source(f"{a}*2"), parse_source(f"{b}*0.5")], dedup=True, seed=1)
    assert res.duplicates == 2
    texts = [c.messages[0].content for c in res.conversations]
    assert sum(t.startswith("a") for t in texts) == 20 and sum(t.startswith("b") for t in texts) == 5
    again = load_conversations([parse_source(f"{a}*2"), parse_source(f"{b}*0.5")], dedup=True, seed=1)
    assert [c.messages[0].content for c in again.conversations] == texts  # seeded


def test_split_count_fraction_and_error():
    tr, va = split(list(range(100)), 10, seed=0)
    assert len(va) == 10 and len(tr) == 90 and sorted(tr + va) == list(range(100))
    tr, va = split(list(range(100)), 0.25, seed=0)
    assert len(va) == 25
    assert split(list(range(100)), 0.25, seed=0) == (tr, va)
    with pytest.raises(DataError, match=r"val_size \(100\) must leave training data: there are only 100"):
        split(list(range(100)), 100, seed=0)


def test_text_blocks():
    blocks = group_text_blocks([[1, 2, 3], [4, 5, 6, 7]], 3)
    assert [b.input_ids for b in blocks] == [[1, 2, 3], [4, 5, 6]]
    assert all(b.labels == b.input_ids for b in blocks)


def test_prepare_bundled_samples(tokenizer):
    r = Renderer(tokenizer, get_template("alpaca"), cutoff_len=256)
    data = prepare(r, [parse_source(str(SAMPLES / "instruct.jsonl"))], val_size=20, seed=3, progress=False)
    assert data.stats["val_samples"] == 20
    assert data.stats["train_samples"] + 20 == data.stats["records"] - data.stats["dropped_overlong"]
    assert all(len(s.input_ids) <= 256 for s in data.train)
    assert all(s.labels[-1] == tokenizer.eos_token_id for s in data.train)


def test_bundled_samples_all_load():
    for name in ["instruct.jsonl", "chat.jsonl", "chat_sharegpt.json", "chat_openai.jsonl", "medical.jsonl", "legal.jsonl", "pretrain.txt"]:
        res = load_conversations([parse_source(str(SAMPLES / name))])
        assert len(res.conversations) >= 10, name
