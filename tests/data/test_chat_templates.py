"""``template: auto`` with ChatML-, Llama-3- and Llama-2-style templates on a LLaMA SentencePiece
tokenizer: one BOS, the template's own terminator trained and stopped on, truncation keeps it."""

import pytest
from helpers import LLAMA2_TEMPLATE as LLAMA2

from chinese_vicuna.data.formats import Conversation, Message, to_conversation
from chinese_vicuna.data.templates import get_template
from chinese_vicuna.data.tokenize import IGNORE, Renderer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIALS = {"chatml": ["<|im_start|>", "<|im_end|>"], "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "llama2": []}
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "llama2": LLAMA2}
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": "</s>"}
MSGS = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "北京是哪里？"},
        {"role": "assistant", "content": "北京是中国的首都。"}]


@pytest.fixture(params=list(TEMPLATES))
def styled(request, tmp_path_factory):
    """(style, tokenizer): the LLaMA SentencePiece tokenizer with the style's special tokens and template."""
    from helpers import make_llama_sp_tokenizer
    from transformers import AddedToken

    from chinese_vicuna.model.load import load_tokenizer

    style = request.param
    tok = load_tokenizer(str(make_llama_sp_tokenizer(tmp_path_factory.mktemp(style))))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[style]], special_tokens=True)
    tok.chat_template = TEMPLATES[style]
    return style, tok


def trained_ids(sample):
    return [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE]


def test_one_bos_whole_string_and_terminator(styled):
    style, tok = styled
    t = get_template("auto", tok)
    end_id = tok.convert_tokens_to_ids(END[style])
    assert t.end_token_ids() == [end_id]
    conv = to_conversation({"messages": MSGS}, "auto", "x:1")
    s = Renderer(tok, t, cutoff_len=1024).render(conv)
    text = tok.apply_chat_template(MSGS, tokenize=False)
    assert t.text(conv, eos=tok.eos_token) == text
    # the ids are the rendered string tokenized once, as chat engines do (the template decides BOS):
    # exactly one BOS where the template writes it, none where it does not
    assert s.input_ids == tok.apply_chat_template(MSGS, return_dict=True)["input_ids"]
    assert s.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert s.input_ids.count(tok.bos_token_id) == (0 if style == "chatml" else 1 if style == "llama3" else 2)
    if style != "chatml":
        assert s.input_ids[0] == tok.bos_token_id and s.input_ids[1] != tok.bos_token_id
    # both replies and their terminators are trained; EOS is not appended when the template has its own end
    trained = trained_ids(s)
    assert trained.count(end_id) == 2 and trained[-1] == end_id
    if style != "llama2":
        assert tok.eos_token_id not in s.input_ids
    replies = tok.decode(trained, skip_special_tokens=True)
    assert "你好！有什么可以帮你？" in replies and "北京是中国的首都。" in replies and "北京是哪里" not in replies
    # the prompt for generation: the template's own, tokenized the same way
    prompt = Conversation(conv.messages[:-1])
    fed = tok.apply_chat_template(MSGS[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert Renderer(tok, t).prompt_ids(prompt) == fed


def test_overlong_samples_are_truncated_with_the_terminator(styled):
    style, tok = styled
    t = get_template("auto", tok)
    end_id = tok.convert_tokens_to_ids(END[style])
    conv = Conversation([Message("user", "问题"), Message("assistant", "回答" * 200)])
    full = Renderer(tok, t, cutoff_len=4096).render(conv)
    s = Renderer(tok, t, cutoff_len=len(full.input_ids) - 50).render(conv)
    assert s is not None and s.truncated and len(s.input_ids) == len(full.input_ids) - 50
    trained = trained_ids(s)
    assert trained[-1] == end_id and trained.count(end_id) == 1
    body = tok.decode(trained[:-1], skip_special_tokens=True).strip()
    assert "回答回答" in body and set(body) <= set("回答") and len(body) < 400
    assert full.trained - 50 <= s.trained < full.trained


def test_engine_stops_on_the_terminator(styled):
    """Generation ends on the template's terminator even when it is not the tokenizer's EOS."""
    import torch
    from helpers import make_tiny_llama

    from chinese_vicuna.generation.decode import GenArgs, eos_ids
    from chinese_vicuna.generation.engine import Engine

    style, tok = styled
    end_id = tok.convert_tokens_to_ids(END[style])
    model = make_tiny_llama(len(tok))
    engine = Engine(model, tok, get_template("auto", tok))
    assert end_id in eos_ids(engine.model, tok) and tok.eos_token_id in eos_ids(engine.model, tok)
    # make the terminator the model's greedy first token: lm_head sees only it after this prompt
    conv = Conversation([Message("user", "你好")])
    ids = engine.prompt_ids(conv)
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[end_id] = 10 * h / h.dot(h)
    out = engine.generate(conv, GenArgs(max_new_tokens=6, repetition_penalty=1.0))
    assert (out.finish_reason, out.completion_tokens, out.text) == ("stop", 1, "")
