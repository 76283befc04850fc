"""Constrained decoding (llguidance), logprobs, logit_bias and chunked prefill in the token iterator."""

from __future__ import annotations

import json
from collections import deque

import jsonschema
import pytest
import torch

from chinese_vicuna.generation import decode
from chinese_vicuna.generation.constrain import (
    OURS,
    CallFormat,
    Constraint,
    ConstraintError,
    Tool,
    _lark,
    detect_call_format,
    parse_tool_calls,
    render_call,
    tool_prompt,
)
from chinese_vicuna.generation.decode import GenArgs, TextStream, iter_steps

PROMPT = [17, 250, 4093, 198, 15076, 229, 20887]
SCHEMA = {
    "type": "object",
    "properties": {
        "城市": {"type": "string", "maxLength": 6},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "sunny": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["晴", "雨", "风"]}, "maxItems": 3},
    },
    "required": ["城市", "days", "sunny", "tags"],
    "additionalProperties": False,
}


def _text(model, tokenizer, gen: GenArgs) -> TextStream:
    s = TextStream(model, tokenizer, PROMPT, gen)
    s.run()
    return s


@pytest.mark.parametrize("sample", [False, True])
def test_json_schema_reply_always_validates(tiny_model, tokenizer, sample):
    for seed in range(3 if sample else 1):
        gen = GenArgs(max_new_tokens=120, do_sample=sample, temperature=1.0, top_k=0, top_p=1.0, seed=seed,
                      repetition_penalty=1.0, constraint=Constraint("json", SCHEMA))
        s = _text(tiny_model, tokenizer, gen)
        assert s.finish_reason == "stop", s.text  # the grammar ended it, not max_new_tokens
        jsonschema.validate(json.loads(s.text), SCHEMA)
    # unconstrained, the random model writes no JSON at all
    free = _text(tiny_model, tokenizer, GenArgs(max_new_tokens=30, repetition_penalty=1.0)).text
    with pytest.raises(ValueError):
        json.loads(free)


def test_json_object_and_bad_schema(tiny_model, tokenizer):
    s = _text(tiny_model, tokenizer, GenArgs(max_new_tokens=200, repetition_penalty=1.0, constraint=Constraint("json")))
    if s.finish_reason == "stop":
        assert isinstance(json.loads(s.text), dict)
    else:  # cut by the token limit: still a prefix of an object
        assert s.text.startswith("{")
    bad = Constraint("json", {"type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}}})
    with pytest.raises(ConstraintError, match="no-such-format"):
        _text(tiny_model, tokenizer, GenArgs(max_new_tokens=5, constraint=bad))


def test_required_tool_call_validates(tiny_model, tokenizer):
    params = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["unit", "n"], "additionalProperties": False}
    c = Constraint("tools", tools=(Tool("weather", params), Tool("time", {"type": "object", "properties": {}})),
                   required=True, parallel=False)
    s = _text(tiny_model, tokenizer, GenArgs(max_new_tokens=80, repetition_penalty=1.0, constraint=c))
    head, calls = parse_tool_calls(s.text)
    assert head == "" and len(calls) == 1 and calls[0]["name"] in ("weather", "time")
    if calls[0]["name"] == "weather":
        jsonschema.validate(calls[0]["arguments"], params)


def test_logprobs_match_a_forward_pass(tiny_model, tokenizer):
    gen = GenArgs(max_new_tokens=6, repetition_penalty=1.0, logprobs=3)
    st = deque(iter_steps(tiny_model, PROMPT, gen, [2], 0), maxlen=1)[0]
    assert len(st.logprobs) == len(st.committed) == 6
    with torch.no_grad():
        logits = tiny_model(torch.tensor([PROMPT + st.committed])).logits[0].float()
    ref = torch.log_softmax(logits[len(PROMPT) - 1 : -1], -1)
    for i, entry in enumerate(st.logprobs):
        assert entry.token == st.committed[i]
        assert entry.logprob == pytest.approx(float(ref[i, entry.token]), abs=1e-4)
        assert [t for t, _ in entry.top] == ref[i].topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token  # greedy: the chosen token is the most likely


def test_logit_bias_steers(tiny_model, tokenizer):
    base = deque(iter_steps(tiny_model, PROMPT, GenArgs(max_new_tokens=3, repetition_penalty=1.0), [2], 0), maxlen=1)[0]
    forced = deque(iter_steps(tiny_model, PROMPT, GenArgs(max_new_tokens=3, repetition_penalty=1.0,
                                                          logit_bias={4093: 100.0}), [2], 0), maxlen=1)[0]
    assert forced.committed == [4093] * 3 and base.committed != forced.committed
    banned = deque(iter_steps(tiny_model, PROMPT, GenArgs(max_new_tokens=3, repetition_penalty=1.0,
                                                          logit_bias={base.committed[0]: -100.0}), [2], 0), maxlen=1)[0]
    assert banned.committed[0] != base.committed[0]


def test_chunked_prefill_equals_whole_and_cancels(tiny_model, tokenizer, monkeypatch):
    prompt = PROMPT * 5
    whole = deque(iter_steps(tiny_model, prompt, GenArgs(max_new_tokens=8, repetition_penalty=1.0), [2], 0), maxlen=1)[0]
    monkeypatch.setattr(decode, "PREFILL_CHUNK", 4)
    chunked = deque(iter_steps(tiny_model, prompt, GenArgs(max_new_tokens=8, repetition_penalty=1.0), [2], 0), maxlen=1)[0]
    assert chunked.committed == whole.committed
    forwards = []
    real = decode.forward_last
    monkeypatch.setattr(decode, "forward_last", lambda *a: forwards.append(1) or real(*a))
    s = TextStream(tiny_model, tokenizer, prompt, GenArgs(max_new_tokens=8), cancel=lambda: True)
    assert s.run() == "" and s.finish_reason == "cancelled"
    assert len(forwards) == 1  # a client that left stops the prefill after one chunk of 9


def test_tool_prompt_and_call_round_trip():
    tools = (Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}}, "查询天气"),)
    prompt = tool_prompt(tools)
    assert '{"name": "get_weather", "description": "查询天气", "parameters": {"type": "object"' in prompt
    assert '<tool_call>{"name":"NAME","arguments":{...}}</tool_call>' in prompt
    text = render_call("get_weather", {"city": "北京"}) + "\n" + render_call("time", {})
    assert text == '<tool_call>{"name":"get_weather","arguments":{"city":"北京"}}</tool_call>\n' \
                   '<tool_call>{"name":"time","arguments":{}}</tool_call>'
    assert parse_tool_calls("好的 " + text) == ("好的", [
        {"name": "get_weather", "arguments": {"city": "北京"}, "raw": '{"city":"北京"}'},
        {"name": "time", "arguments": {}, "raw": "{}"}])
    assert parse_tool_calls("no calls") is None and parse_tool_calls("<tool_call>{broken") is None
    assert parse_tool_calls(text + '<tool_call>{"name":"cut')[1] == parse_tool_calls(text)[1]  # cut by max_tokens


def test_template_call_formats_parse_and_detect():
    """A chat template's own call format: tagged blocks with its whitespace, or one bare JSON object."""
    tagged = CallFormat("<tool_call>", "</tool_call>", "\n", "\n", "arguments", ", ", ": ", "tagged")
    bare = CallFormat("", "", "", "", "parameters", ", ", ": ", "json")
    two = tagged.write("get_weather", {"city": "北京"}) + "\n" + tagged.write("time", {})
    assert two == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n' \
                  '<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>'
    assert parse_tool_calls(two, tagged) == ("", [
        {"name": "get_weather", "arguments": {"city": "北京"}, "raw": '{"city": "北京"}'},
        {"name": "time", "arguments": {}, "raw": "{}"}])
    one = bare.write("get_weather", {"city": "北京"})
    assert one == '{"name": "get_weather", "parameters": {"city": "北京"}}'
    assert parse_tool_calls(" " + one, bare) == ("", [
        {"name": "get_weather", "arguments": {"city": "北京"}, "raw": '{"city": "北京"}'}])
    assert parse_tool_calls("北京晴", bare) is None and parse_tool_calls('{"name": "get_weather", "para', bare) is None
    assert OURS.write("t", {}) == render_call("t", {})
    # the grammar: bare JSON allows one call and text that does not begin with '{'
    grammar = _lark(Constraint("tools", tools=(Tool("t"),), format=bare))
    assert "<tool_call>" not in grammar and '"parameters"' in grammar and "call (" not in grammar
    assert grammar.endswith(r"TEXT: /\s{0,2}[^\{\s][\s\S]*/") and '"item_separator": ", "' in grammar

    def render(messages, tools, gen):  # writes calls as the Llama-3.1 style does
        out = "".join(
            (json.dumps({"name": m["tool_calls"][0]["function"]["name"],
                         "parameters": m["tool_calls"][0]["function"]["arguments"]}, ensure_ascii=False)
             if m.get("tool_calls") else m["content"]) + "<end>" for m in messages if m["role"] != "tool")
        return out + ("A:" if gen else "")

    assert detect_call_format(lambda m, t, g: render(m, t, g).replace("A:", "") if g else render(m, t, g),
                              "<end>") == bare
    assert detect_call_format(render, "<end>") is None  # the generation prompt is not where calls start

    def broken(messages, tools, gen):
        raise ValueError("cannot render")

    assert detect_call_format(broken, "<end>") is None


def test_arguments_first_format_is_written_in_its_order(tiny_model, tokenizer):
    """Hermes-2-Pro writes ``{"arguments": .., "name": ..}``: detected, and the grammar keeps that order."""
    def render(messages, tools, gen):
        out = ""
        for m in messages:
            if m.get("tool_calls"):
                f = m["tool_calls"][0]["function"]
                out += '<tool_call>\n{"arguments": ' + json.dumps(f["arguments"]) + ', "name": "' + f["name"] + '"}\n</tool_call> <e>'
            elif m["role"] != "tool":
                out += m["content"] + "<e>"
        return out

    fmt = detect_call_format(render, "<e>")
    assert fmt == CallFormat("<tool_call>", "</tool_call>", "\n", "\n", "arguments", ", ", ": ", "tagged", False)
    assert fmt.write("f", {"a": 1}) == '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>'
    params = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]}
    c = Constraint("tools", tools=(Tool("weather", params),), required=True, parallel=False, format=fmt)
    for seed in range(2):
        s = _text(tiny_model, tokenizer, GenArgs(max_new_tokens=60, do_sample=True, seed=seed, top_k=0, top_p=1.0,
                                                 repetition_penalty=1.0, constraint=c))
        head, calls = parse_tool_calls(s.text, fmt)
        assert s.text.strip() == fmt.write("weather", calls[0]["arguments"]) and head == ""
        jsonschema.validate(calls[0]["arguments"], params)
