import copy

import pytest

from chinese_vicuna.data.formats import Conversation, Message, to_conversation
from chinese_vicuna.data.templates import get_template

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n翻译成英文\n\n### Input:\n你好\n\n### Response:\nHello"
)
ALPACA_PLAIN = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n介绍长城\n\n### Response:\n长城很长"
)
VICUNA_HEADER = (
    "The following is a conversation between an AI assistant called Assistant and a human user called User. "
    "The assistant is intelligent, knowledgeable and polite to answer questions of user.\n\n"
)


def test_alpaca_exact_with_and_without_input():
    t = get_template("alpaca")
    conv = to_conversation({"instruction": "翻译成英文", "input": "你好", "output": "Hello"}, "auto", "x:1")
    assert t.text(conv) == ALPACA_INPUT
    conv = to_conversation({"instruction": "介绍长城", "output": "长城很长"}, "auto", "x:1")
    assert t.text(conv) == ALPACA_PLAIN
    assert t.text(conv, eos="</s>") == ALPACA_PLAIN + "</s>"


def test_alpaca_generation_prompt_ends_at_response():
    t = get_template("alpaca")
    conv = Conversation([Message("user", "介绍长城")])
    assert t.text(conv, add_generation_prompt=True) == ALPACA_PLAIN[: -len("长城很长")]


def test_vicuna_chat_exact_multi_turn():
    t = get_template("vicuna-chat")
    conv = to_conversation({"input": ["你好", "北京呢？"], "output": ["你好！", "是首都。"]}, "auto", "x:1")
    # Chinese-Vicuna's chat_prompt: history "User:{q}\n\nAssistant:{a}\n\n" without EOS; EOS after the final reply
    want = VICUNA_HEADER + "User:你好\n\nAssistant:你好！\n\nUser:北京呢？\n\nAssistant:是首都。<eos>"
    assert t.text(conv, eos="<eos>") == want
    gen = Conversation(conv.messages[:3])
    assert t.text(gen, add_generation_prompt=True, eos="<eos>") == (
        VICUNA_HEADER + "User:你好\n\nAssistant:你好！\n\nUser:北京呢？\n\nAssistant:"
    )


def test_system_prompt_overrides_header():
    t = get_template("vicuna-chat", system_prompt="你是一个乐于助人的助手。")
    conv = Conversation([Message("user", "hi"), Message("assistant", "ok")])
    assert t.text(conv) == "你是一个乐于助人的助手。\n\nUser:hi\n\nAssistant:ok"


def test_auto_template_matches_tokenizer_chat_template(tokenizer):
    t = get_template("auto", tokenizer)
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见！"}]
    conv = to_conversation({"messages": msgs}, "auto", "x:1")
    assert t.text(conv) == tokenizer.apply_chat_template(msgs, tokenize=False)
    segs = t.segments(conv)
    assert [s.text for s in segs if s.kind == "reply"] == ["你好！", "再见！"]
    assert [s.text for s in segs if s.kind == "end"] == ["<|im_end|>", "<|im_end|>"]  # the template's own marker
    prompt = Conversation(conv.messages[:3])
    assert t.text(prompt, add_generation_prompt=True) == tokenizer.apply_chat_template(
        msgs[:3], tokenize=False, add_generation_prompt=True
    )


# --- the same templates as Jinja chat templates (what merge / export-gguf / vLLM get) -----------------

JINJA_CASES = {
    "plain": [{"role": "user", "content": "介绍长城"}, {"role": "assistant", "content": "长城很长"}],
    "input": [{"role": "user", "content": "翻译成英文", "input": "你好"}, {"role": "assistant", "content": "Hello"}],
    "system": [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "ok"}],
    "multi": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
              {"role": "user", "content": "北京呢？", "input": "中国"}, {"role": "assistant", "content": "是首都。"}],
}


def as_conversation(msgs):
    return Conversation([Message(m["role"], m["content"], m.get("input", "")) for m in msgs])


@pytest.mark.parametrize("name,system_prompt", [("alpaca", None), ("alpaca", "你是医生。"), ("vicuna-chat", None),
                                                ("vicuna-chat", "你是医生。"), ("auto", None), ("auto", "你是医生。")])
def test_saved_chat_template_renders_what_we_train(any_tokenizer, tmp_path, name, system_prompt):
    """A tokenizer saved with our template: apply_chat_template renders our text and feeds our ids."""
    from transformers import AutoTokenizer

    from chinese_vicuna.data.tokenize import Renderer, save_tokenizer

    tok = any_tokenizer
    if name == "auto" and not tok.chat_template:
        from transformers import AddedToken

        tok = copy.deepcopy(tok)
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
                       special_tokens=True)
        tok.chat_template = CHATML
    t = get_template(name, tok, system_prompt)
    save_tokenizer(tok, t, tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    llama = tok.bos_token == "<s>"
    bos = "<s>" if llama and name != "auto" else ""  # our templates write BOS where the model adds it
    for case, msgs in JINJA_CASES.items():
        if name == "auto":  # the tokenizer's own template knows no Alpaca input block
            msgs = [{k: v for k, v in m.items() if k != "input"} for m in msgs]
        eos = tok.eos_token
        got = saved.apply_chat_template(msgs, tokenize=False)
        assert got == bos + t.text(as_conversation(msgs), eos=eos), case
        prompt = msgs[:-1]
        got = saved.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert got == bos + t.text(as_conversation(prompt), add_generation_prompt=True, eos=eos), case
        if system_prompt and case != "system":
            assert system_prompt in got
        # the ids a chat engine feeds (rendered chat, tokenized without adding specials) are ours
        fed = saved.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert fed == Renderer(tok, t).prompt_ids(as_conversation(prompt)), case
        # and the saved tokenizer tokenizes plain text as the one we trained with
        text = t.text(as_conversation(msgs), eos=eos)
        assert saved(text)["input_ids"] == tok(text)["input_ids"]


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
