"""Tools through a model's own tool-aware chat template (``template: auto``): the prompt is the
template's render with ``tools=``, the reply is constrained to and parsed in the template's call
format (Hermes/Qwen ``<tool_call>`` blocks, Llama-3.1 bare JSON), and templates whose format we do
not recognise fall back to our own tool prompt. A tiny random model, in process."""

from __future__ import annotations

import json
import logging
import re

import jsonschema
import openai
import pytest
from helpers import make_tiny_llama
from starlette.testclient import TestClient

from chinese_vicuna.data.templates import get_template
from chinese_vicuna.generation.constrain import OURS, CallFormat, Constraint, Tool, parse_tool_calls
from chinese_vicuna.generation.decode import GenArgs
from chinese_vicuna.generation.engine import Engine
from chinese_vicuna.serve import native_tools
from chinese_vicuna.serve.openai_api import _chat_prompt, create_app
from chinese_vicuna.serve.replies import _Choice
from chinese_vicuna.serve.schemas import ChatRequest, constraint, to_conversation

# Hermes / Qwen2.5 style: tools listed in the system turn, calls as <tool_call> blocks with a newline
# inside, results grouped into one user turn as <tool_response> blocks.
HERMES = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call functions. Signatures within <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nReturn each call within <tool_call></tool_call> tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls | default([]) %}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' + (call.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3.1 style: tools in the first user turn, one call per reply as a bare JSON object with
# "parameters", results in an ipython turn.
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n\\n' }}{%- endif %}{{- system + '<|eot_id|>' }}"
    "{%- if tools %}{%- set first = messages[0].content %}{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, respond with a JSON for a "
    "function call.\\n\\nRespond in the format {\"name\": function name, \"parameters\": dictionary of argument "
    "name and its value}.\\n\\n' }}"
    "{%- for t in tools %}{{- (t | tojson(indent=4)) + '\\n\\n' }}{%- endfor %}{{- first + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{%- if message.tool_calls | length != 1 %}{{- raise_exception('only single tool calls') }}{%- endif %}"
    "{%- set call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + call.name + '\", \"parameters\": ' "
    "+ (call.arguments | tojson) + '}<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Reads tools, but writes calls as a bracketed list after a marker: not a format we recognise.
OTHER = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if loop.first and tools %}{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{%- if message.tool_calls %}{{- '[TOOL_CALLS]' + (message.tool_calls | map(attribute='function') | list | tojson) }}"
    "{%- else %}{{- message.content }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TEMPLATES = {"hermes": HERMES, "llama31": LLAMA31, "other": OTHER}
FORMATS = {
    "hermes": CallFormat("<tool_call>", "</tool_call>", "\n", "\n", "arguments", ", ", ": ", "tagged"),
    "llama31": CallFormat("", "", "", "", "parameters", ", ", ": ", "json"),
    "other": None,
}
PARAMS = {"type": "object", "properties": {"city": {"enum": ["北京", "上海"]}, "unit": {"enum": ["c", "f"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "现在几点",
                                           "parameters": {"type": "object", "properties": {}}}}]
DEFS = (Tool("get_weather", PARAMS, "查询天气"), Tool("get_time", {"type": "object", "properties": {}}, "现在几点"))
ARGS = '{"city": "北京", "unit": "c", "days": 2}'
HISTORY = [
    {"role": "system", "content": "你是一个助手。"},
    {"role": "user", "content": "北京明天的天气怎么样？"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "晴，25度"},
    {"role": "user", "content": "那上海呢？"},
]
# What transformers' tool-use docs say a template is given for the same conversation.
NATIVE = [
    {"role": "system", "content": "你是一个助手。"},
    {"role": "user", "content": "北京明天的天气怎么样？"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call_1", "function": {"name": "get_weather", "arguments": json.loads(ARGS)}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "晴，25度"},
    {"role": "user", "content": "那上海呢？"},
]
SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def engines():
    """style -> an Engine: a tiny random model and the SmolLM2 tokenizer carrying the style's template."""
    from transformers import AddedToken

    from chinese_vicuna.model.load import load_tokenizer, resolve_base_model

    out = {}
    for style, source in TEMPLATES.items():
        tok = load_tokenizer(resolve_base_model(None))
        if style == "llama31":
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS], special_tokens=True)
        tok.chat_template = source
        out[style] = Engine(make_tiny_llama(len(tok), seed=3), tok, get_template("auto", tok))
    return out


def request(**body) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": HISTORY, "tools": TOOLS, **body})


def written(text: str, fmt: CallFormat) -> list[dict]:
    """The calls of a reply, checked to be exactly what the template writes for them."""
    parsed = parse_tool_calls(text, fmt)
    assert parsed is not None and parsed[0] == "", text
    calls = parsed[1]
    blocks = re.sub(re.escape(fmt.close) + r"\s+", fmt.close, text.strip()) if fmt.close else text.strip()
    assert blocks == "".join(fmt.write(c["name"], c["arguments"]) for c in calls)
    for c in calls:
        jsonschema.validate(c["arguments"], PARAMS if c["name"] == "get_weather" else {"type": "object"})
        assert json.loads(c["raw"]) == c["arguments"]
    return calls


def test_call_format_is_read_from_the_template(engines, tokenizer, caplog):
    for style, engine in engines.items():
        assert engine.template.supports_tools()
        native_tools._FORMATS.pop(engine.template, None)  # detect afresh, whatever ran before
        with caplog.at_level(logging.INFO, logger=native_tools.__name__):
            caplog.clear()
            assert native_tools.native_format(engine.template) == FORMATS[style]
            assert native_tools.native_format(engine.template) == FORMATS[style]  # detected once, logged once
        assert len(caplog.records) == 1
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == (1 if style == "other" else 0)
        if style == "other":
            assert "our own tool prompt" in warned[0]
    hermes = FORMATS["hermes"]
    assert hermes.write("f", {"a": 1}) == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert FORMATS["llama31"].write("f", {"a": 1}) == '{"name": "f", "parameters": {"a": 1}}'
    # the model's own template of SmolLM2 (plain ChatML) reads no tools: our prompt, as before
    plain = get_template("auto", tokenizer)
    assert not plain.supports_tools() and native_tools.native_format(plain) is None
    assert native_tools.native_format(get_template("alpaca")) is None


@pytest.mark.parametrize("style", ["hermes", "llama31"])
def test_prompt_is_the_templates_own_render(engines, style):
    engine = engines[style]
    tok, fmt = engine.tokenizer, FORMATS[style]
    req = request(tool_choice="auto")
    ids, prefill, cons = _chat_prompt(engine, req, constraint(req))
    text = tok.apply_chat_template(NATIVE, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    msgs, pre = native_tools.native_messages(req.messages, fmt)
    assert (msgs, pre, prefill) == (NATIVE, "", "")
    assert engine.template.render_tools(msgs, native_tools.tool_schemas(req), True) == text
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert cons.format == fmt and cons.tools == DEFS and not cons.required
    assert "You can call the following functions" not in text  # no tool prompt of ours
    if style == "hermes":
        assert text.endswith(
            '<|im_start|>user\n北京明天的天气怎么样？<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": '
            '"get_weather", "arguments": {"city": "北京", "unit": "c", "days": 2}}\n</tool_call><|im_end|>\n'
            "<|im_start|>user\n<tool_response>\n晴，25度\n</tool_response><|im_end|>\n"
            "<|im_start|>user\n那上海呢？<|im_end|>\n<|im_start|>assistant\n")
        assert text.startswith("<|im_start|>system\n你是一个助手。\n\n# Tools\n") and json.dumps(
            TOOLS[0], ensure_ascii=False) in text
    else:
        assert text.endswith(
            '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "北京", '
            '"unit": "c", "days": 2}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n晴，25度<|eot_id|>'
            "<|start_header_id|>user<|end_header_id|>\n\n那上海呢？<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # a prefill continues the reply: the prompt and the prefill are one string
    pre_req = request(messages=HISTORY + [{"role": "assistant", "content": "好的"}])
    ids2, prefill2, _ = _chat_prompt(engine, pre_req, constraint(pre_req))
    assert prefill2 == "好的" and ids2 == tok(text + "好的", add_special_tokens=False)["input_ids"]
    # tool_choice none: the history is still the template's, but no tools and no grammar
    none = request(tool_choice="none")
    ids3, _, cons3 = _chat_prompt(engine, none, constraint(none))
    assert cons3 is None
    assert ids3 == tok(tok.apply_chat_template(NATIVE, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]


def test_unknown_format_falls_back_to_our_prompt(engines):
    engine = engines["other"]
    req = request(tool_choice="required")
    ids, prefill, cons = _chat_prompt(engine, req, constraint(req))
    conv, _ = to_conversation(req.messages, DEFS, "")
    assert cons.format == OURS and ids == engine.prompt_ids(conv)
    text = engine.tokenizer.decode(ids)
    assert "You can call the following functions" in text and "[AVAILABLE_TOOLS]" not in text
    assert '<tool_call>{"name":"get_weather","arguments":{"city":"北京","unit":"c","days":2}}</tool_call>' in text


@pytest.mark.parametrize("style", ["hermes", "llama31"])
def test_grammar_allows_only_text_or_native_calls(engines, style):
    engine, fmt = engines[style], FORMATS[style]
    req = request()
    ids, _, _ = _chat_prompt(engine, req, constraint(req))
    kinds = set()
    for required, parallel in ((False, True), (True, False), (True, True)):
        cons = Constraint("tools", tools=DEFS, required=required, parallel=parallel, format=fmt)
        for seed in range(4):
            gen = GenArgs(max_new_tokens=120, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=seed,
                          repetition_penalty=1.0, constraint=cons)
            out = engine.generate(ids, gen)
            if parse_tool_calls(out.text, fmt) is None:  # a text reply: never anything that begins like a call
                assert not required and not out.text.lstrip().startswith(fmt.open or "{"), out.text
                kinds.add("text")
                continue
            text = out.text
            if out.finish_reason == "length":  # a random model may go on calling: the cut call is dropped
                assert parallel and fmt.multi, text
                text = text[: text.rindex(fmt.close) + len(fmt.close)]
            calls = written(text, fmt)
            assert len(calls) == 1 or (parallel and fmt.multi)
            kinds.add("call")
    assert kinds == {"text", "call"}  # both branches were taken


@pytest.mark.parametrize("style", ["hermes", "llama31"])
def test_api_native_tool_calls(engines, style):
    """The OpenAI SDK over the app: calls in the template's format come back in OpenAI's shape."""
    engine, fmt = engines[style], FORMATS[style]
    with TestClient(create_app(engine)) as http:
        c = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        kw = dict(model=engine.name, messages=HISTORY, tools=TOOLS, max_tokens=120, parallel_tool_calls=False)
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            r = c.chat.completions.create(tool_choice=choice, temperature=0, **kw)
            ch = r.choices[0]
            assert ch.finish_reason == "tool_calls" and ch.message.content is None and len(ch.message.tool_calls) == 1
            call = ch.message.tool_calls[0]
            assert call.type == "function" and call.id.startswith("call_") and isinstance(call.function.arguments, str)
            if choice != "required":
                assert call.function.name == "get_weather"
            if call.function.name == "get_weather":
                jsonschema.validate(json.loads(call.function.arguments), PARAMS)
            # the arguments string is what the model wrote, in the template's format
            assert fmt.write(call.function.name, json.loads(call.function.arguments)).count(call.function.arguments) == 1
        named = call
        chunks = list(c.chat.completions.create(tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                temperature=0, stream=True, **kw))
        deltas = [tc for chunk in chunks if chunk.choices for tc in chunk.choices[0].delta.tool_calls or []]
        assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
        assert "".join(d.function.arguments or "" for d in deltas) == named.function.arguments
        assert len(deltas) > 2  # the arguments stream as they are written
        assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "tool_calls"
        for seed in range(3):  # auto: a text reply or calls, never a broken mix
            msg = c.chat.completions.create(tool_choice="auto", temperature=1.0, seed=seed, **kw).choices[0].message
            if msg.tool_calls:
                args = json.loads(msg.tool_calls[0].function.arguments)
                assert msg.tool_calls[0].function.name != "get_weather" or jsonschema.validate(args, PARAMS) is None
            else:
                assert msg.content is not None and not msg.content.startswith(fmt.open or "{")
        # the Responses API goes through the same prompt and format
        resp = c.responses.create(model=engine.name, input=HISTORY[1]["content"], tool_choice="required",
                                  tools=[{"type": "function", **TOOLS[0]["function"]}], max_output_tokens=120,
                                  temperature=0, parallel_tool_calls=False)
        fc = [o for o in resp.output if o.type == "function_call"]
        assert len(fc) == 1 and fc[0].name == "get_weather"
        jsonschema.validate(json.loads(fc[0].arguments), PARAMS)


@pytest.mark.parametrize("style", ["hermes", "llama31"])
def test_native_calls_stream_as_written(style):
    fmt = FORMATS[style]
    text = " " + fmt.write("get_weather", {"city": "北京", "note": "}</x>"}) + (
        "\n" + fmt.write("get_time", {}) if fmt.multi else "")
    ch = _Choice("", strip=True, tools=fmt)
    deltas = []
    for piece in [text[i : i + 3] for i in range(0, len(text), 3)]:
        assert ch.push(piece) == ""
        deltas += ch.call_deltas()
    names = [(d["index"], d["function"]["name"]) for d in deltas if "id" in d]
    assert names == [(0, "get_weather"), (1, "get_time")][: 2 if fmt.multi else 1]
    args = ["".join(d["function"]["arguments"] for d in deltas if d["index"] == k) for k in range(len(names))]
    calls = ch.calls()
    want = ['{"city": "北京", "note": "}</x>"}', "{}"][: len(names)]
    assert [c["function"]["arguments"] for c in calls] == want
    # what was streamed is a prefix of each call's arguments (bare JSON holds its last brace until the end)
    assert all(w.startswith(a) and len(a) >= len(w) - 1 for a, w in zip(args, want))
    assert [c["id"] for c in calls] == [d["id"] for d in deltas if "id" in d]


def test_llamacpp_backend_renders_and_calls_natively(tiny_model_dir, tmp_path):
    """The llama.cpp backend takes the same path: the GGUF carries the tool-aware template, the prompt ids
    are the template's own render, and a required call comes out in the template's format."""
    import shutil

    from chinese_vicuna.generation.engine import load_engine
    from chinese_vicuna.model.load import load_tokenizer
    from chinese_vicuna.tools.gguf import export_gguf

    folder = tmp_path / "hermes"
    shutil.copytree(tiny_model_dir, folder)
    tok = load_tokenizer(str(folder))
    tok.chat_template = HERMES
    tok.save_pretrained(folder)
    cpp = load_engine("llama.cpp", str(export_gguf(str(folder), tmp_path / "h.gguf", gguf_type="f32")),
                      template="auto", n_ctx=1024)
    try:
        req = request(tool_choice="required", parallel_tool_calls=False)
        ids, prefill, cons = _chat_prompt(cpp, req, constraint(req))
        text = tok.apply_chat_template(NATIVE, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert cons.format == FORMATS["hermes"] and prefill == ""
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        out = cpp.generate(ids, GenArgs(max_new_tokens=120, repetition_penalty=1.0, constraint=cons))
        calls = written(out.text, FORMATS["hermes"])
        assert len(calls) == 1 and calls[0]["name"] in ("get_weather", "get_time"), out.text
    finally:
        cpp.model.close()
