"""Rendering -> token ids + labels on SmolLM2's BPE and on a LLaMA SentencePiece tokenizer.

The ids must be the whole rendered string tokenized once (what vLLM, llama.cpp and the seeds
feed), and the labels exactly the reply tokens. Expected labels are built independently: the
string is tokenized up to each boundary, and the boundaries must be clean (a prefix's ids are a
prefix of the whole string's ids), so the reply's tokens are the difference.
"""

import time

import pytest

from chinese_vicuna.data.formats import Conversation, Message, to_conversation
from chinese_vicuna.data.templates import get_template
from chinese_vicuna.data.tokenize import IGNORE, Renderer

CHAT = {"input": ["你好", "北京是哪里？"], "output": ["你好！有什么可以帮你？", "北京是中国的首都。"]}
RECORDS = {
    "plain": {"instruction": "介绍长城", "output": "长城很长。"},
    "input": {"instruction": "翻译成英文", "input": "你好，世界", "output": "Hello, world."},
    "english": {"instruction": "Say hello.", "output": "The answer is hello."},
    "history": {"instruction": "还有呢？", "output": "还有故宫。", "history": [["北京有什么？", "有长城。"]]},
    "system": {"messages": [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好"},
                            {"role": "assistant", "content": "你好！"}]},
}


def conv_of(name):
    return to_conversation(RECORDS[name], "auto", f"{name}:1")


def template_for(name, tok):
    if name == "auto" and not getattr(tok, "chat_template", None):
        pytest.skip("this tokenizer has no chat template (auto is tested on built-in templates below)")
    return get_template(name, tok)


def reference_labels(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids of the joined text, and labels from tokenizing each prefix (boundaries must be clean)."""
    ids = tok("".join(p for p, _ in pieces))["input_ids"]
    runs: list[tuple[str, bool]] = []  # only the trained/untrained boundaries need to be clean
    for piece, trained in pieces:
        if runs and runs[-1][1] == trained:
            runs[-1] = (runs[-1][0] + piece, trained)
        else:
            runs.append((piece, trained))
    labels, done, text = [], 0, ""
    for piece, trained in runs:
        text += piece
        upto = tok(text)["input_ids"]
        n = len(upto) if upto == ids[: len(upto)] else None
        assert n is not None, f"unclean token boundary after {text[-20:]!r}"
        labels += ids[done:n] if trained else [IGNORE] * (n - done)
        done = n
    return ids, labels


@pytest.mark.parametrize("template", ["alpaca", "vicuna-chat", "auto"])
@pytest.mark.parametrize("record", list(RECORDS))
def test_ids_are_the_whole_string_tokenized(any_tokenizer, template, record):
    tok = any_tokenizer
    t = template_for(template, tok)
    conv = conv_of(record)
    r = Renderer(tok, t, cutoff_len=4096)
    s = r.render(conv)
    text = t.text(conv, eos=tok.eos_token)
    assert s.input_ids == tok(text)["input_ids"]
    end = [seg.text for seg in t.segments(conv, eos=tok.eos_token) if seg.kind == "end"][-1]
    assert end in (tok.eos_token, "<|im_end|>")
    assert (conv.messages[-1].content + end) in tok.decode(s.input_ids, skip_special_tokens=False)
    # the generation prompt is rendered and tokenized the same way
    prompt = Conversation(conv.messages[:-1])
    assert r.prompt_ids(prompt) == tok(t.text(prompt, add_generation_prompt=True, eos=tok.eos_token))["input_ids"]
    # labels: exactly the tokens of the replies (+ their terminator), mask=assistant
    pieces = [(seg.text, seg.kind in ("reply", "end")) for seg in t.segments(conv, eos=tok.eos_token) if seg.text]
    ids, labels = reference_labels(tok, pieces)
    assert (s.input_ids, s.labels) == (ids, labels)


def test_llama_reply_has_no_extra_space_piece(llama_tokenizer):
    """Tokenizing the reply on its own gives it a leading ``▁``; the whole string does not."""
    tok = llama_tokenizer
    conv = conv_of("english")
    s = Renderer(tok, get_template("alpaca"), cutoff_len=512).render(conv)
    trained = [t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE]
    pieces = tok.convert_ids_to_tokens(trained)
    assert pieces[-1] == "</s>" and not pieces[0].startswith("▁")
    assert trained[:-1] != tok("The answer is hello.", add_special_tokens=False)["input_ids"]  # the ▁The variant
    assert tok.decode(trained[:-1]) == "The answer is hello."
    # one BOS, and "\n\n### Response:\n" tokenized as in the string (no "▁" before "\n\n###")
    assert s.input_ids.count(tok.bos_token_id) == 1 and s.input_ids[0] == tok.bos_token_id
    prompt_pieces = tok.convert_ids_to_tokens(s.input_ids[: len(s.input_ids) - len(trained)])
    assert "▁" not in prompt_pieces[-8:]


def test_vicuna_chat_multi_turn_labels_on_llama(llama_tokenizer):
    """Chinese-Vicuna's prompt: no EOS inside the history, EOS after the trained final reply."""
    tok = llama_tokenizer
    conv = to_conversation(CHAT, "auto", "x:1")
    for mask, first_trained in (("assistant", True), ("last", False)):
        s = Renderer(tok, get_template("vicuna-chat"), cutoff_len=512, mask=mask).render(conv)
        head = get_template("vicuna-chat").default_system + "\n\n"
        pieces = [(head + "User:你好\n\nAssistant:", False), ("你好！有什么可以帮你？", first_trained),
                  ("\n\nUser:北京是哪里？\n\nAssistant:", False), ("北京是中国的首都。</s>", True)]
        assert (s.input_ids, s.labels) == reference_labels(tok, pieces)
        assert s.input_ids.count(tok.eos_token_id) == 1 and s.input_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("mask", ["assistant", "last", "none"])
def test_mask_modes(any_tokenizer, mask):
    tok = any_tokenizer
    r = Renderer(tok, get_template("alpaca"), cutoff_len=512, mask=mask)
    conv = to_conversation({"instruction": "再说一个", "output": "第二个回答。", "history": [["说一个", "第一个回答。"]]},
                           "auto", "x:1")
    s = r.render(conv)
    t = get_template("alpaca")
    segs = [seg for seg in t.segments(conv, eos=tok.eos_token) if seg.text]
    pieces = [(seg.text, mask == "none" or (seg.kind in ("reply", "end") and (mask == "assistant" or seg.turn == 1)))
              for seg in segs]
    ids, labels = reference_labels(tok, pieces)
    if mask == "none" and tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
        labels[0] = IGNORE  # an added BOS is never a target
    assert (s.input_ids, s.labels) == (ids, labels)
    # every trained token is at the position of the token it labels
    assert all(lab in (IGNORE, t) for t, lab in zip(s.input_ids, s.labels))


def test_truncation_drops_old_turns_first_and_keeps_eos(any_tokenizer):
    tok = any_tokenizer
    long_chat = {"input": ["第一个问题" * 20, "第二个问题"], "output": ["第一个回答" * 20, "第二个回答。"]}
    conv = to_conversation(long_chat, "auto", "x")
    full = Renderer(tok, get_template("vicuna-chat"), cutoff_len=4096).render(conv)
    r = Renderer(tok, get_template("vicuna-chat"), cutoff_len=len(full.input_ids) - 10)
    s = r.render(conv)
    assert s.truncated and len(s.input_ids) <= r.cutoff_len
    text = tok.decode(s.input_ids)
    assert "第一个问题" not in text and "第二个问题" in text and text.endswith("第二个回答。" + tok.eos_token)
    assert s.labels[-1] == tok.eos_token_id
    # what is left is the second turn alone, rendered and tokenized as a whole string
    alone = Conversation([Message("user", "第二个问题"), Message("assistant", "第二个回答。")])
    assert s.input_ids == Renderer(tok, get_template("vicuna-chat"), cutoff_len=4096).render(alone).input_ids


def test_truncation_of_a_single_turn_keeps_reply_eos(any_tokenizer):
    tok = any_tokenizer
    rec = {"instruction": "长" * 100, "output": "答" * 100}
    r = Renderer(tok, get_template("alpaca"), cutoff_len=64)
    s = r.render(to_conversation(rec, "auto", "x"))
    assert len(s.input_ids) == 64 and s.truncated
    assert s.input_ids[-1] == tok.eos_token_id and s.labels[-1] == tok.eos_token_id
    assert s.trained > 1
    assert set(tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE][:-1])) == {"答"}
    assert "### Response:" in tok.decode(s.input_ids)
    drop = Renderer(tok, get_template("alpaca"), cutoff_len=64, overlong="drop")
    assert drop.render(to_conversation(rec, "auto", "x")) is None


def test_auto_template_trains_reply_and_end_marker(tokenizer):
    r = Renderer(tokenizer, get_template("auto", tokenizer), cutoff_len=512)
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    s = r.render(to_conversation({"messages": msgs}, "auto", "x"))
    trained = [t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE]
    assert trained == tokenizer("你好！<|im_end|>", add_special_tokens=False)["input_ids"]
    assert s.input_ids == tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]


def test_rendering_is_linear_in_turns(tokenizer):
    """5,000 exchanges render (template text and segments) in well under a second."""
    turns = [m for i in range(5000) for m in (Message("user", f"问题{i}"), Message("assistant", f"回答{i}。"))]
    conv = Conversation(turns)
    for name in ("auto", "vicuna-chat", "alpaca"):
        t = get_template(name, tokenizer)
        start = time.perf_counter()
        segs = t.segments(conv, eos=tokenizer.eos_token)
        took = time.perf_counter() - start
        assert took < 1.0, f"{name}: {took:.2f} s"
        assert sum(s.kind == "reply" for s in segs) == 5000
    r = Renderer(tokenizer, get_template("auto", tokenizer), cutoff_len=10**6)
    start = time.perf_counter()
    s = r.render(conv)
    assert time.perf_counter() - start < 5.0 and s.trained > 5000
