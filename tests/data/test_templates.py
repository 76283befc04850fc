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
    want = VICUNA_HEADER + "User:你好\n\nAssistant:你好！<eos>\n\nUser:北京呢？\n\nAssistant:是首都。<eos>"
    assert t.text(conv, eos="<eos>") == want
    gen = Conversation(conv.messages[:3])
    assert t.text(gen, add_generation_prompt=True, eos="<eos>") == (
        VICUNA_HEADER + "User:你好\n\nAssistant:你好！<eos>\n\nUser:北京呢？\n\nAssistant:"
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
    replies = [s.text for s in segs if s.kind == "reply"]
    assert replies == ["你好！<|im_end|>", "再见！<|im_end|>"]
    assert not any(s.eos for s in segs)  # the template's own end marker is the EOS
    prompt = Conversation(conv.messages[:3])
    assert t.text(prompt, add_generation_prompt=True) == tokenizer.apply_chat_template(
        msgs[:3], tokenize=False, add_generation_prompt=True
    )
