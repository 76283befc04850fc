import pytest

from chinese_vicuna.data.formats import Conversation, to_conversation
from chinese_vicuna.data.templates import get_template
from chinese_vicuna.data.tokenize import IGNORE, Renderer

CHAT = {"input": ["你好", "北京是哪里？"], "output": ["你好！有什么可以帮你？", "北京是中国的首都。"]}


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_alpaca_labels_exact(tokenizer):
    r = Renderer(tokenizer, get_template("alpaca"), cutoff_len=512)
    conv = to_conversation({"instruction": "介绍长城", "output": "长城很长"}, "auto", "x:1")
    s = r.render(conv)
    prompt = get_template("alpaca").text(conv)[: -len("长城很长")]
    p_ids, a_ids = enc(tokenizer, prompt), enc(tokenizer, "长城很长")
    eos = tokenizer.eos_token_id
    # segments are tokenized separately, so the prompt ids are the concatenation of its pieces
    assert s.input_ids[-len(a_ids) - 1 :] == a_ids + [eos]
    assert s.labels == [IGNORE] * (len(s.input_ids) - len(a_ids) - 1) + a_ids + [eos]
    assert tokenizer.decode(s.input_ids) == prompt + "长城很长" + tokenizer.eos_token
    # the training prompt is token-for-token the inference prompt
    assert s.input_ids[: -len(a_ids) - 1] == r.prompt_ids(Conversation(conv.messages[:1]))
    assert len(p_ids) > 10


@pytest.mark.parametrize("mask", ["assistant", "last", "none"])
def test_mask_modes(tokenizer, mask):
    r = Renderer(tokenizer, get_template("vicuna-chat"), cutoff_len=512, mask=mask)
    s = r.render(to_conversation(CHAT, "auto", "x:1"))
    eos = tokenizer.eos_token_id
    trained = [t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE]
    a1, a2 = enc(tokenizer, CHAT["output"][0]), enc(tokenizer, CHAT["output"][1])
    if mask == "assistant":
        assert trained == a1 + [eos] + a2 + [eos]
    elif mask == "last":
        assert trained == a2 + [eos]
    else:
        assert s.labels == s.input_ids
    # every trained token is at the position of the token it labels
    assert all(lab in (IGNORE, t) for t, lab in zip(s.input_ids, s.labels))


def test_truncation_drops_old_turns_first_and_keeps_eos(tokenizer):
    long_chat = {"input": ["第一个问题" * 20, "第二个问题"], "output": ["第一个回答" * 20, "第二个回答。"]}
    full = Renderer(tokenizer, get_template("vicuna-chat"), cutoff_len=4096).render(to_conversation(long_chat, "auto", "x"))
    r = Renderer(tokenizer, get_template("vicuna-chat"), cutoff_len=len(full.input_ids) - 10)
    s = r.render(to_conversation(long_chat, "auto", "x"))
    assert s.truncated and len(s.input_ids) <= r.cutoff_len
    text = tokenizer.decode(s.input_ids)
    assert "第一个问题" not in text and "第二个问题" in text and text.endswith("第二个回答。" + tokenizer.eos_token)
    assert s.labels[-1] == tokenizer.eos_token_id


def test_truncation_of_a_single_turn_keeps_reply_eos(tokenizer):
    rec = {"instruction": "长" * 100, "output": "答" * 100}
    r = Renderer(tokenizer, get_template("alpaca"), cutoff_len=64)
    s = r.render(to_conversation(rec, "auto", "x"))
    assert len(s.input_ids) == 64 and s.truncated
    assert s.input_ids[-1] == tokenizer.eos_token_id and s.labels[-1] == tokenizer.eos_token_id
    assert s.trained > 1
    assert Renderer(tokenizer, get_template("alpaca"), cutoff_len=64, overlong="drop").render(to_conversation(rec, "auto", "x")) is None


def test_auto_template_trains_reply_and_end_marker(tokenizer):
    r = Renderer(tokenizer, get_template("auto", tokenizer), cutoff_len=512)
    conv = to_conversation({"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}, "auto", "x")
    s = r.render(conv)
    trained = [t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE]
    assert trained == enc(tokenizer, "你好！") + [tokenizer.eos_token_id]
    assert s.input_ids == tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}], tokenize=True, return_dict=True
    )["input_ids"]
