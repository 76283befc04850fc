"""ChatSession on the tiny model: exact prompts, the token budget, undo/regenerate/clear, save/load."""

from __future__ import annotations

import json
import random
import threading

import pytest

from chinese_vicuna.chat.session import ELLIPSIS, ChatError, ChatSession
from chinese_vicuna.generation.decode import GenArgs
from chinese_vicuna.generation.engine import Engine

EOS = "<|im_end|>"
HEADER = (
    "The following is a conversation between an AI assistant called Assistant and a human user "
    "called User. The assistant is intelligent, knowledgeable and polite to answer questions of user.\n\n"
)
HANZI = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好"
WORDS = ["hello", "model", "token", "LoRA", "42", "，", "。", "！", "？", " ", "\n", "🙂", "é"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir) -> Engine:
    return Engine.load(str(tiny_model_dir), [str(tiny_adapter_dir)])


def chat(engine, **kw) -> ChatSession:
    kw.setdefault("gen", GenArgs(max_new_tokens=8))
    return ChatSession(engine, **kw)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(HANZI) if rng.random() < 0.7 else rng.choice(WORDS) for _ in range(n))


def test_multi_turn_prompt_is_exact_for_vicuna_chat(engine):
    s = chat(engine, template="vicuna-chat")
    s.history = [("你好", "你好！有什么可以帮你？"), ("一加一等于几？", "等于二。")]
    want = (
        HEADER + "User:你好\n\nAssistant:你好！有什么可以帮你？\n\nUser:一加一等于几？\n\nAssistant:等于二。"
        "\n\nUser:再见\n\nAssistant:"
    )
    assert s.prompt_text("再见") == want
    s.set_system("你是一个乐于助人的助手。")
    assert s.prompt_text("再见") == "你是一个乐于助人的助手。\n\n" + want[len(HEADER) :]
    # The stream is fed exactly those ids.
    ids, _ = s.prompt("再见")
    reply = s.send("再见")
    reply.run()
    assert reply.prompt_tokens == len(ids)


def test_send_streams_and_records_the_turn(engine, tiny_adapter_dir):
    s = chat(engine)
    assert s.adapter == tiny_adapter_dir.name and s.template.name == "alpaca"
    reply = s.send("天空为什么是蓝色的？")
    deltas = list(reply)
    assert deltas and "".join(deltas) == reply.text
    assert "\ufffd" not in reply.text
    assert reply.finish_reason in ("stop", "length") and 0 < reply.completion_tokens <= 8
    assert s.history == [("天空为什么是蓝色的？", reply.text.strip())]
    second = s.send("为什么？")
    second.run()
    assert len(s.history) == 2
    # The second prompt really carried the first turn.
    history = f"### Instruction:\n天空为什么是蓝色的？\n\n### Response:\n{reply.text.strip()}\n\n### Instruction:\n"
    assert history in s.prompt_text("x") and EOS not in s.prompt_text("x")  # no EOS inside the history


def test_budget_is_never_exceeded_for_random_histories(engine):
    rng = random.Random(1234)
    s = chat(engine, template="vicuna-chat")
    floor = len(s._ids([], ""))
    trimmed = cut = 0
    for _ in range(120):
        s.history = [
            (random_text(rng, rng.randint(0, 60)), random_text(rng, rng.randint(0, 80))) for _ in range(rng.randint(0, 8))
        ]
        s.max_memory = rng.randint(floor + 1, 260)
        s.gen = GenArgs(max_new_tokens=rng.choice([8, 64, 300]))
        message = random_text(rng, rng.randint(1, 120))
        limit = min(s.max_memory, engine.context_length - s.gen.max_new_tokens)
        assert s.budget() == limit
        ids, trim = s.prompt(message)
        assert len(ids) <= limit
        turns = s.history
        kept = turns[trim.dropped_turns :]
        if trim == type(trim)():
            assert ids == s._ids(turns, message)
            continue
        trimmed += 1
        if trim.cut_chars:  # the message is cut only when it alone is over budget
            cut += 1
            assert not kept and len(s._ids([], message)) > limit
            assert ids == s._ids([], ELLIPSIS + message[trim.cut_chars :])
            assert len(s._ids([], ELLIPSIS + message[trim.cut_chars - 1 :])) > limit or trim.cut_chars == 1
        elif trim.shortened_turn:  # oldest kept turn shortened, the rest intact
            assert kept and len(s._ids(kept[1:], message)) <= limit < len(s._ids(kept, message))
        else:  # whole turns dropped, oldest first, and no more than needed
            assert ids == s._ids(kept, message)
            assert len(s._ids(turns[trim.dropped_turns - 1 :], message)) > limit
    assert trimmed > 40 and cut > 5  # the cases really exercised the trimming


def test_oldest_turns_go_first_then_the_oldest_kept_is_shortened(engine):
    s = chat(engine, template="vicuna-chat")
    turns = [(f"第{i}轮问题：" + "很长的背景说明" * 6, f"第{i}轮回答。") for i in range(5)]
    s.history = turns
    message = "最后的问题"
    s.max_memory = len(s._ids(turns[3:], message)) + 25  # the turn overhead (~8) and a part of the text
    ids, trim = s.prompt(message)
    assert (trim.dropped_turns, trim.shortened_turn, trim.cut_chars) == (2, True, 0) and trim.notice is None
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert len(ids) <= s.max_memory
    assert "第0轮" not in text and "第1轮" not in text
    start = text.index("User:" + ELLIPSIS) + len("User:" + ELLIPSIS)
    end = text.index("\n\nAssistant:", start)
    assert turns[2][0].endswith(text[start:end]) and text[start:end]  # the beginning of turn 2 is cut
    tail = "".join(f"\n\nUser:{u}\n\nAssistant:{a}" for u, a in turns[3:])  # no EOS inside the history
    assert text.endswith("Assistant:第2轮回答。" + tail + "\n\nUser:最后的问题\n\nAssistant:")
    # One token less room than the intact turns need: turn 3 is now the shortened one.
    s.max_memory = len(s._ids(turns[3:], message)) - 1
    assert s.prompt(message)[1].dropped_turns == 3


def test_an_overlong_message_is_cut_at_its_beginning_and_reported(engine):
    s = chat(engine, template="vicuna-chat", max_memory=60)
    s.history = [("你好", "你好！")]
    message = "这是一段非常长的消息。" * 30 + "结尾"
    reply = s.send(message)
    assert reply.trim.cut_chars > 0 and reply.trim.dropped_turns == 1
    assert f"first {reply.trim.cut_chars} characters" in reply.trim.notice
    text = s.prompt_text(message)
    assert text.startswith(HEADER + "User:" + ELLIPSIS) and text.endswith("结尾\n\nAssistant:")
    reply.run()
    assert s.history[-1][0] == message  # the history keeps the whole message


def test_budget_errors_are_clear(engine):
    s = chat(engine, max_memory=5)
    with pytest.raises(ChatError, match="template alone take"):
        s.prompt("你好")
    s = chat(engine, gen=GenArgs(max_new_tokens=600))
    with pytest.raises(ChatError, match="lower max_new_tokens"):
        s.prompt("你好")


def test_undo_regenerate_clear(engine):
    s = chat(engine)
    first = s.send("你好").run().strip()
    second = s.send("一加一等于几？").run().strip()
    assert s.undo() == ("一加一等于几？", second)
    assert s.history == [("你好", first)]
    s.send("一加一等于几？").run()
    again = s.regenerate()
    assert again.run().strip() == second  # greedy: the same history gives the same reply
    assert s.history == [("你好", first), ("一加一等于几？", second)]
    s.set("do_sample", "true")
    s.set("seed", "7")
    sampled = s.regenerate().run().strip()
    assert len(s.history) == 2 and s.history[-1] == ("一加一等于几？", sampled)
    s.clear()
    assert s.history == [] and s.undo() is None
    with pytest.raises(ChatError, match="nothing to regenerate"):
        s.regenerate()
    with pytest.raises(ChatError, match="empty message"):
        s.send("   ")


def test_cancel_keeps_the_partial_reply_and_frees_the_engine(engine):
    s = chat(engine, gen=GenArgs(max_new_tokens=64, min_new_tokens=64))
    reply = s.send("写一首长诗")
    it = iter(reply)
    first = next(it)
    assert s.busy
    with pytest.raises(ChatError, match="stop it first"):
        s.undo()
    threading.Thread(target=s.stop).start()  # the web UI's Stop runs on another thread
    rest = list(it)
    assert reply.finish_reason == "cancelled" and not s.busy
    assert reply.text == first + "".join(rest) and reply.completion_tokens < 64
    assert s.history == [("写一首长诗", reply.text.strip())]
    # Abandoning the generator (Ctrl-C, a closed browser tab) also records the partial text.
    reply = s.send("再写一首")
    it = iter(reply)
    partial = next(it)
    it.close()
    assert reply.finish_reason == "cancelled" and s.history[-1] == ("再写一首", partial.strip())
    assert not engine.lock.locked()
    # A cancel callable works as well as stop().
    reply = s.send("第三首", cancel=lambda: True)
    reply.run()
    assert reply.finish_reason == "cancelled" and reply.completion_tokens == 1


def test_save_load_round_trip(engine, tmp_path):
    s = chat(engine, system="你是一个助手。", max_memory=300)
    s.send("你好").run()
    s.send("介绍一下长城").run()
    s.set("temperature", "0.5")
    s.set_template("vicuna-chat")
    path = s.save(tmp_path / "chats" / "c.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["history"][0] == {"user": "你好", "assistant": s.history[0][1]}
    assert data["gen"]["temperature"] == 0.5 and data["template"] == "vicuna-chat"
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.json"]  # no temp file left behind
    other = chat(engine)
    other.load(path)
    assert (other.history, other.gen, other.system, other.max_memory) == (s.history, s.gen, s.system, s.max_memory)
    assert other.template.name == "vicuna-chat" and other.prompt_text("再见") == s.prompt_text("再见")
    # A bad file changes nothing.
    data["gen"]["top_k"] = "many"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ChatError, match="top_k: expected int"):
        other.load(bad)
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ChatError, match="not JSON"):
        other.load(bad)
    assert other.history == s.history and other.gen == s.gen


def test_set_checks_types_and_ranges(engine):
    s = chat(engine)
    assert s.set("temperature", "0.5") == 0.5 and s.gen.temperature == 0.5
    assert s.set("temperature", 1) == 1.0 and isinstance(s.gen.temperature, float)
    assert s.set("max-new-tokens", "16") == 16 and s.gen.max_new_tokens == 16
    assert s.set("do_sample", "yes") is True
    assert s.set("seed", "none") is None and s.set("seed", 3) == 3
    assert s.set("max_memory", "128") == 128 and s.max_memory == 128
    for param, value, match in [
        ("top_k", 1.5, "top_k: expected int, got float"),
        ("top_k", "abc", "top_k: expected int"),
        ("num_beams", True, "expected int, got bool"),
        ("do_sample", "maybe", "do_sample: expected bool"),
        ("top_p", "1.5", "0 < top_p <= 1"),
        ("temperature", 0, "temperature: expected > 0, got 0.0"),
        ("max_new_tokens", 0, "max_new_tokens: expected >= 1"),
        ("temprature", 1.0, "did you mean temperature"),
    ]:
        with pytest.raises(ChatError, match=match):
            s.set(param, value)
    assert s.gen.temperature == 1.0 and s.gen.top_k == GenArgs().top_k


def test_adapter_selection_and_beam_search(engine):
    s = chat(engine)
    with_adapter = s.send("你好").run()
    s.clear()
    s.set_adapter("base")
    assert s.send("你好").run() != with_adapter
    with pytest.raises(ChatError, match="unknown adapter"):
        s.set_adapter("nope")
    s.clear()
    s.set("num_beams", 3)
    reply = s.send("你好")
    seen = []
    for delta in reply:
        seen.append(delta)
        assert reply.best_text  # the typewriter view is there while searching
    assert "".join(seen) == reply.text and s.history[-1][1] == reply.text.strip()
