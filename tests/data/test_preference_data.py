"""Preference records: every format parsed exactly, bad records named by file:line and field, and
chosen/rejected tokenized exactly as SFT tokenizes the same conversation."""

import json

import pytest
from helpers import SAMPLES, write_jsonl

from chinese_vicuna.data.datasets import DataError, Source
from chinese_vicuna.data.formats import Conversation, Message
from chinese_vicuna.data.preference import (
    KTOSample,
    PairSample,
    Preference,
    Unpaired,
    load_preferences,
    prepare_preferences,
    to_preference,
)
from chinese_vicuna.data.templates import get_template
from chinese_vicuna.data.tokenize import IGNORE, Renderer


def msgs(p):
    return [(m.role, m.content, m.context) for m in p.prompt]


GOOD = {
    "trl-strings": (
        {"prompt": "天空为什么是蓝色的？", "chosen": "因为瑞利散射。", "rejected": "因为海是蓝的。"},
        [("user", "天空为什么是蓝色的？", "")], "因为瑞利散射。", "因为海是蓝的。",
    ),
    "trl-messages": (
        {
            "prompt": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                       {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "讲个笑话"}],
            "chosen": [{"role": "assistant", "content": "好的：……"}],
            "rejected": [{"role": "assistant", "content": "不讲。"}],
        },
        [("system", "你是助手。", ""), ("user", "你好", ""), ("assistant", "你好！", ""), ("user", "讲个笑话", "")],
        "好的：……", "不讲。",
    ),
    "trl-implicit": (
        {
            "chosen": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}],
            "rejected": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "3"}],
        },
        [("user", "1+1=?", "")], "2", "3",
    ),
    "alpaca": (
        {"instruction": "翻译成英文", "input": "你好", "chosen": "Hello", "rejected": "Bonjour", "system": "S"},
        [("system", "S", ""), ("user", "翻译成英文", "你好")], "Hello", "Bonjour",
    ),
    "sharegpt": (
        {
            "conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                              {"from": "human", "value": "今天星期几？"}],
            "chosen": {"from": "gpt", "value": "我无法得知今天的日期。"},
            "rejected": {"from": "gpt", "value": "星期八。"},
            "system": "简洁回答。",
        },
        [("system", "简洁回答。", ""), ("user", "你好", ""), ("assistant", "你好！", ""), ("user", "今天星期几？", "")],
        "我无法得知今天的日期。", "星期八。",
    ),
    "hh-rlhf": (
        {
            "chosen": "\n\nHuman: 你好\n\nAssistant: 你好！\n\nHuman: 推荐一本书\n\nAssistant: 《红楼梦》。",
            "rejected": "\n\nHuman: 你好\n\nAssistant: 你好！\n\nHuman: 推荐一本书\n\nAssistant: 自己找。",
        },
        [("user", "你好", ""), ("assistant", "你好！", ""), ("user", "推荐一本书", "")], "《红楼梦》。", "自己找。",
    ),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_paired_formats(name):
    record, prompt, chosen, rejected = GOOD[name]
    p = to_preference(record, "f.jsonl:3")
    assert isinstance(p, Preference)
    assert (msgs(p), p.chosen, p.rejected, p.source) == (prompt, chosen, rejected, "f.jsonl:3")


def test_kto_format():
    u = to_preference({"prompt": "你好", "completion": "你好！", "label": True}, "k:1")
    assert isinstance(u, Unpaired) and (msgs(u), u.completion, u.desirable) == ([("user", "你好", "")], "你好！", True)
    u = to_preference({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "x"}],
                       "label": False}, "k:2")
    assert (msgs(u), u.completion, u.desirable) == ([("user", "hi", "")], "x", False)


BAD = [
    ({"prompt": "q", "chosen": "a"}, "f:7: rejected: expected a string or a list with one assistant message"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "f:7: chosen: expected non-empty text"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "f:7: prompt: expected a string or a non-empty list of messages"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "f:7: prompt: expected the prompt to end with a user message"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
     "f:7: prompt[0].role: expected one of ['assistant', 'system', 'user'], got 'robot'"),
    ({"instruction": "", "chosen": "a", "rejected": "b"}, "f:7: instruction: expected non-empty text"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
     "f:7: chosen.from: expected 'gpt', got 'human'"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": 1}, "rejected": {"from": "gpt", "value": "b"}},
     "f:7: chosen.value: expected a string, got int"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
     "f:7: chosen/rejected: expected the same dialogue before the last '\\n\\nAssistant: '"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "Human: a Assistant: d"},
     "f:7: rejected: expected the text to start with '\\n\\nHuman: '"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]},
     "f:7: chosen/rejected: expected the same prompt (all messages before the last reply)"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "f:7: label: expected true or false, got 'yes'"),
    ({"instruction": "q", "output": "a"}, None),  # an SFT record: named as not a preference record
    ([1, 2], "f:7: record: expected a JSON object, got list"),
]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_records_name_line_and_field(record, message):
    with pytest.raises(Exception) as e:
        to_preference(record, "f:7")
    if message is None:
        assert str(e.value).startswith("f:7: chosen: expected a string or a list with one assistant message")
    else:
        assert str(e.value) == message


def test_load_reports_file_line_and_stage(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": "b"},
    ])
    with pytest.raises(DataError, match=rf"^{tmp_path}/p.jsonl:2: rejected: expected a string"):
        load_preferences([Source(str(f))], "dpo")
    got = load_preferences([Source(str(f))], "dpo", on_bad_record="skip")
    assert len(got.records) == 1 and got.rejects[0]["where"] == f"{f}:2"
    k = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "a", "completion": "b", "label": True}])
    with pytest.raises(DataError, match=r"k.jsonl:1: record: expected a chosen/rejected pair for stage dpo"):
        load_preferences([Source(str(k))], "dpo")


def test_kto_splits_pairs_and_dedups(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "x", "completion": "y", "label": False},
    ])
    got = load_preferences([Source(str(f))], "kto")
    assert [(r.completion, r.desirable) for r in got.records] == [("b", True), ("c", False), ("y", False)]
    assert got.duplicates == 2


def test_bundled_sample_is_a_real_chinese_preference_set():
    rows = [json.loads(line) for line in (SAMPLES / "preference.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 100
    assert len({r["instruction"] for r in rows}) == len(rows)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    got = load_preferences([Source(str(SAMPLES / "preference.jsonl"))], "dpo")
    assert len(got.records) == len(rows) and not got.rejects


@pytest.mark.parametrize("tok_name", ["tokenizer", "llama_tokenizer"])
@pytest.mark.parametrize("template", ["alpaca", "vicuna-chat"])
def test_pairs_tokenize_as_sft_does_and_train_only_the_reply(request, tok_name, template, tmp_path):
    tok = request.getfixturevalue(tok_name)
    tpl = get_template(template, tok, None)
    rec = GOOD["trl-messages"][0]
    f = write_jsonl(tmp_path / "p.jsonl", [rec])
    renderer = Renderer(tok, tpl, 512, "last")
    data = prepare_preferences(renderer, [Source(str(f))], "dpo", progress=False)
    (pair,) = data.train
    assert isinstance(pair, PairSample)
    prompt = [Message("system", "你是助手。"), Message("user", "你好"), Message("assistant", "你好！"), Message("user", "讲个笑话")]
    for reply, sample in (("好的：……", pair.chosen), ("不讲。", pair.rejected)):
        conv = Conversation(prompt + [Message("assistant", reply)])
        sft = Renderer(tok, tpl, 512, "last").render(conv)
        assert sample.input_ids == sft.input_ids and sample.labels == sft.labels
        trained = [t for t in sample.labels if t != IGNORE]
        # the trained tokens are exactly the final reply and its terminator
        assert tok.decode(trained).strip().startswith(reply)
        first = next(i for i, t in enumerate(sample.labels) if t != IGNORE)
        assert all(t != IGNORE for t in sample.labels[first:])
        assert reply not in tok.decode(sample.input_ids[:first])
    # the two share the prompt tokens
    first = next(i for i, t in enumerate(pair.chosen.labels) if t != IGNORE)
    assert pair.chosen.input_ids[: first - 1] == pair.rejected.input_ids[: first - 1]


def test_kto_samples_get_a_mismatched_kl_pair(tokenizer, tmp_path):
    rows = [{"prompt": f"问题{i}", "completion": f"回答{i}", "label": i % 2 == 0} for i in range(6)]
    f = write_jsonl(tmp_path / "k.jsonl", rows)
    renderer = Renderer(tokenizer, get_template("alpaca", tokenizer, None), 256, "last")
    data = prepare_preferences(renderer, [Source(str(f))], "kto", progress=False)
    assert len(data.train) == 6 and all(isinstance(s, KTOSample) for s in data.train)
    for s in data.train:
        text, kl = tokenizer.decode(s.sample.input_ids), tokenizer.decode(s.kl.input_ids)
        q = text.split("问题")[1][0]
        assert f"问题{q}" in kl and f"回答{q}" not in kl  # same prompt, another record's reply
    assert data.stats["train_desirable"] == 3 and data.stats["train_undesirable"] == 3
