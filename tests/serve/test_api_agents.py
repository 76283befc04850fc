"""What agent frameworks call, end to end against a real ``chinese-vicuna serve`` on the tiny model:
structured output, tools, logprobs, logit_bias, embeddings, Responses (OpenAI SDK and
langchain-openai), hostile bodies, CORS, /health under load and SIGTERM.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import signal
import struct
import threading
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from helpers import ROOT
from pydantic import BaseModel, Field

from chinese_vicuna.data.formats import Conversation, Message
from chinese_vicuna.data.templates import get_template
from chinese_vicuna.data.tokenize import Renderer

Q = "北京明天的天气怎么样？"
ORIGIN = "https://app.example"
SCHEMA = {
    "type": "object",
    "properties": {"城市": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
                   "sunny": {"type": "boolean"}},
    "required": ["城市", "days", "sunny"],
    "additionalProperties": False,
}
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"enum": ["北京", "上海"]}, "unit": {"enum": ["c", "f"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气",
                                           "parameters": WEATHER_PARAMS}}]


class Weather(BaseModel):
    """A weather report."""

    city: str = Field(max_length=6)
    days: int = Field(ge=1, le=7)
    sunny: bool


def _serve_conftest():
    spec = importlib.util.spec_from_file_location("serve_conftest", ROOT / "tests" / "serve" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    cf = _serve_conftest()
    args = ["--model", str(tiny_model_dir), "--adapter", f"a={tiny_adapter_dir}", "--cors-origins", ORIGIN]
    proc = cf.ServerProcess(args, tmp_path_factory.mktemp("agents") / "serve.log", cf._env(None))
    yield proc.ready()
    proc.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def base_name(server) -> str:
    return client(server).models.list().data[0].id


def post(server, path: str, body, **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json", **headers})


def _fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}


def test_structured_output(server):
    c = client(server)
    kw = dict(model="a", messages=[{"role": "user", "content": Q}], max_tokens=80, response_format=_fmt(SCHEMA))
    greedy = c.chat.completions.create(temperature=0, **kw).choices[0]
    assert greedy.finish_reason == "stop"
    jsonschema.validate(json.loads(greedy.message.content), SCHEMA)
    chunks = list(c.chat.completions.create(temperature=0, stream=True, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == greedy.message.content
    for seed in (1, 2):
        sampled = c.chat.completions.create(temperature=1.0, seed=seed, **kw).choices[0].message.content
        jsonschema.validate(json.loads(sampled), SCHEMA)
    parsed = c.chat.completions.parse(model="a", messages=kw["messages"], response_format=Weather, temperature=0,
                                      max_tokens=80).choices[0].message.parsed
    assert isinstance(parsed, Weather) and 1 <= parsed.days <= 7
    text = c.completions.create(model="a", prompt="天气：", max_tokens=80, temperature=0,
                                extra_body={"response_format": _fmt(SCHEMA)}).choices[0].text
    jsonschema.validate(json.loads(text), SCHEMA)
    obj = c.chat.completions.create(temperature=0, **{**kw, "max_tokens": 200,
                                                      "response_format": {"type": "json_object"}}).choices[0]
    assert obj.message.content.startswith("{") and (obj.finish_reason == "length" or
                                                     isinstance(json.loads(obj.message.content), dict))
    bad = post(server, "/v1/chat/completions", {**kw, "response_format": _fmt(
        {"type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}}})})
    err = bad.json()["error"]
    assert bad.status_code == 400 and err["param"] == "response_format.json_schema.schema"
    assert "no-such-format" in err["message"]


def test_tool_calls_sdk(server):
    c = client(server)
    msgs = [{"role": "user", "content": Q}]
    kw = dict(model="a", messages=msgs, tools=TOOLS, temperature=0, max_tokens=60)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = c.chat.completions.create(tool_choice=choice, parallel_tool_calls=False, **kw).choices[0]
        assert r.finish_reason == "tool_calls" and len(r.message.tool_calls) == 1
        call = r.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    chunks = list(c.chat.completions.create(tool_choice="required", parallel_tool_calls=False, stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    # auto: a text reply or calls, never a broken mix
    auto = c.chat.completions.create(**kw).choices[0]
    if auto.message.tool_calls:
        jsonschema.validate(json.loads(auto.message.tool_calls[0].function.arguments), WEATHER_PARAMS)
    else:
        assert auto.message.content and "<tool_call>" not in auto.message.content
    # the agent loop's next turn: assistant tool_calls + a tool result + a late system message + prefill
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "晴，25度"},
                      {"role": "system", "content": "用中文回答。"},
                      {"role": "assistant", "content": "北京明天"}]
    nxt = c.chat.completions.create(model="a", messages=history, temperature=0, max_tokens=6)
    assert nxt.choices[0].message.content and nxt.usage.prompt_tokens > 0
    errors = [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ]
    for extra, param in errors:
        r = post(server, "/v1/chat/completions", {"model": "a", "messages": msgs, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_langchain_structured_output_and_tools(server):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="a", temperature=0, max_tokens=80,
                     max_retries=0)
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Weather, method=method).invoke(Q)
        assert isinstance(out, Weather), method
    # json_mode sends no schema: the reply is constrained to a JSON object, which a random model may
    # not close within max_tokens (the SDK then raises with the partial completion attached)
    try:
        content = llm.with_structured_output(Weather, method="json_mode", include_raw=True).invoke(
            "用 JSON 回答：" + Q)["raw"].content
        assert isinstance(json.loads(content), dict)
    except openai.LengthFinishReasonError as e:
        assert e.completion.choices[0].message.content.startswith("{")

    @tool
    def get_weather(city: Literal["北京", "上海"], unit: Literal["c", "f"]) -> str:
        """查询天气"""
        return "晴"

    msg = llm.bind_tools([get_weather], tool_choice="any").invoke(Q)
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(msg.tool_calls[0]["args"], WEATHER_PARAMS)
    follow = llm.invoke([HumanMessage(Q), AIMessage("", tool_calls=msg.tool_calls),
                         ToolMessage("晴", tool_call_id=msg.tool_calls[0]["id"])])
    assert isinstance(follow.content, str) and follow.content
    resp_llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="a", temperature=0, max_tokens=8,
                          max_retries=0, use_responses_api=True)
    via_responses = resp_llm.invoke(Q)
    via_chat = llm.bind(max_tokens=8).invoke(Q)
    assert via_responses.text == via_chat.text and via_chat.text


def _reference_greedy(model_dir, tokenizer, n: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = Renderer(tokenizer, get_template("alpaca")).prompt_ids(Conversation([Message("user", Q)]))
    out = []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            tok = int(lp.argmax())
            out.append((tok, lp))
            ids = ids + [tok]
    return out


def test_logprobs_logit_bias_and_refusals(server, tiny_model_dir, tokenizer):
    c = client(server)
    kw = dict(model=base_name(server), messages=[{"role": "user", "content": Q}], temperature=0, max_tokens=5,
              extra_body={"min_tokens": 5})
    r = c.chat.completions.create(logprobs=True, top_logprobs=3, **kw).choices[0]
    entries = r.logprobs.content
    ref = _reference_greedy(tiny_model_dir, tokenizer, 5)
    assert len(entries) == 5
    for e, (tok, lp) in zip(entries, ref):
        assert bytes(e.bytes) == tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(tok)]).encode() \
            or e.token.startswith("bytes:")
        # the server decodes with a KV cache, the reference re-runs the whole sequence: float noise only
        assert e.logprob == pytest.approx(float(lp[tok]), abs=1e-3)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(lp.topk(3).values.tolist(), abs=1e-3)
    streamed = [e for ch in c.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **kw)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    comp = c.completions.create(model=base_name(server), prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
                                extra_body={"min_tokens": 4}).choices[0]
    lp = comp.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset == sorted(lp.text_offset)
    biased = c.completions.create(model="a", prompt="Hello", max_tokens=3, temperature=0,
                                  logit_bias={"4093": 100}).choices[0].text
    assert biased == tokenizer.decode([4093] * 3)
    for extra, param in [({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"),
                         ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 1000}}, "logit_bias"),
                         ({"logprobs": 2, "num_beams": 2}, "num_beams")]:
        bad = post(server, "/v1/completions", {"model": "a", "prompt": "x", **extra})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (extra, bad.text)


def test_embeddings(server, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    c = client(server)
    texts = ["今天天气很好", "今天天气不错", "我喜欢编程"]
    res = c.embeddings.create(model=base_name(server), input=texts)
    vecs = torch.tensor([d.embedding for d in res.data])
    assert vecs.shape == (3, 32) and torch.allclose(vecs.norm(dim=1), torch.ones(3), atol=1e-5)
    assert res.usage.prompt_tokens == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)
    assert torch.allclose(vecs[0], torch.nn.functional.normalize(hidden, dim=0), atol=1e-4)
    raw = httpx.post(server.url + "/v1/embeddings", timeout=30,
                     json={"model": base_name(server), "input": texts[0], "encoding_format": "base64"}).json()
    floats = struct.unpack(f"<{32}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert torch.allclose(torch.tensor(floats), vecs[0], atol=1e-6)
    tuned = c.embeddings.create(model="a", input=texts[0]).data[0].embedding
    assert not torch.allclose(torch.tensor(tuned), vecs[0], atol=1e-3)  # the adapter changes the states
    same = c.embeddings.create(model=base_name(server), input=[texts[0], texts[0]]).data
    assert same[0].embedding == same[1].embedding
    assert post(server, "/v1/embeddings", {"model": "a", "input": []}).status_code == 400
    assert len(c.embeddings.create(model="a", input="x", dimensions=32).data[0].embedding) == 32
    bad = post(server, "/v1/embeddings", {"model": "a", "input": "x", "dimensions": 16})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"


def test_responses_api(server):
    c = client(server)
    r = c.responses.create(model="a", input=Q, instructions="你是助手。", max_output_tokens=10, temperature=0)
    chat = c.chat.completions.create(model="a", messages=[{"role": "system", "content": "你是助手。"},
                                                          {"role": "user", "content": Q}],
                                     max_tokens=10, temperature=0).choices[0]
    assert r.output_text == chat.message.content and r.object == "response"
    assert r.status == ("incomplete" if chat.finish_reason == "length" else "completed")
    assert r.usage.output_tokens <= 10 and r.usage.input_tokens > 0
    events = list(c.responses.create(model="a", input=[{"role": "user", "content": [{"type": "input_text", "text": Q}]}],
                                     instructions="你是助手。", max_output_tokens=10, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text
    structured = c.responses.create(model="a", input=Q, temperature=0, max_output_tokens=80,
                                    text={"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}})
    jsonschema.validate(json.loads(structured.output_text), SCHEMA)
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS}]
    called = c.responses.create(model="a", input=Q, tools=tools, tool_choice="required", temperature=0,
                                max_output_tokens=60)
    call = next(o for o in called.output if o.type == "function_call")
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    follow = c.responses.create(model="a", temperature=0, max_output_tokens=4, tools=tools, input=[
        {"role": "user", "content": Q}, {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "晴"}])
    assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > called.usage.input_tokens
    bad = post(server, "/v1/responses", {"model": "a", "input": Q, "previous_response_id": "resp_1"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "previous_response_id"


GOOD = {"model": "a", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2, "temperature": 0}
HOSTILE_VALUES = [None, -1, 0, 2**70, -(2**70), 1e308, -1e308, "x", "\ud800", [], {}, [[[[]]]], True, {"a": [1]}]
HOSTILE_BODIES = [  # (raw body, expected status, param)
    (b'{"model":"a","messages":[{"role":"user","content":"\\ud800"}]}', 400, "messages[0].content"),
    (b'{"model":"a","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    (json.dumps({**GOOD, "seed": 2**70}).encode(), 400, "seed"),
    (json.dumps({**GOOD, "length_penalty": 1e308, "num_beams": 2}).encode(), 400, "length_penalty"),
    (json.dumps({**GOOD, "top_k": 10**30}).encode(), 400, "top_k"),
    (json.dumps({**GOOD, "max_tokens": 10**30}).encode(), 400, "messages"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "x"}] * 1025}).encode(), 400, "messages"),
    (json.dumps({**GOOD, "response_format": {"type": "json_schema"}}).encode(), 400,
     "response_format.json_schema.schema"),
    (json.dumps({**GOOD, "response_format": _fmt({"type": 5})}).encode(), 400, "response_format.json_schema.schema"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400,
     "messages"),
    (b'{"model":"a","messages":[{"role":"user","content":"x"}],"temperature":NaN}', 400, "temperature"),
    (b'{"model":"a","messages":[{"role":"user","content":"x"}],"n":1e999}', 400, "n"),
]


def test_hostile_bodies_cors_and_content_type(server):
    for body, status, param in HOSTILE_BODIES:
        r = post(server, "/v1/chat/completions", body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body[:120], r.text)
    # every field of a good request replaced by every hostile value: never a 5xx
    fields = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
              "stream", "stream_options", "logit_bias", "logprobs", "top_logprobs", "response_format", "tools",
              "tool_choice", "parallel_tool_calls", "top_k", "num_beams", "repetition_penalty", "length_penalty",
              "no_repeat_ngram_size", "min_tokens", "presence_penalty"]
    others = {"/v1/completions": {"prompt": "x"}, "/v1/responses": {"input": "x", "max_output_tokens": 2},
              "/v1/embeddings": {"input": "x"}}
    with httpx.Client(base_url=server.url, timeout=60, headers={"Content-Type": "application/json"}) as http:
        for field in fields:
            for value in HOSTILE_VALUES:
                r = http.post("/v1/chat/completions", content=json.dumps({**GOOD, field: value}))
                assert r.status_code < 500, (field, value, r.text)
        for path, extra in others.items():
            for field in [*extra, "model", "max_tokens", "max_output_tokens", "seed", "logprobs", "stream", "text",
                          "encoding_format", "instructions", "echo", "dimensions"]:
                for value in HOSTILE_VALUES[::2]:
                    r = http.post(path, content=json.dumps({**GOOD, **extra, field: value}))
                    assert r.status_code < 500, (path, field, value, r.text)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
        r = httpx.post(server.url + path, content=json.dumps(GOOD), headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert httpx.post(server.url + "/v1/chat/completions", content=json.dumps(GOOD)).status_code == 415
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(server.url + "/v1/chat/completions", headers=pre)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    evil = httpx.options(server.url + "/v1/chat/completions", headers={**pre, "Origin": "https://evil.example"})
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    simple = post(server, "/v1/chat/completions", GOOD, Origin=ORIGIN)
    assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ORIGIN
    assert server.alive() and server.health()["status"] == "ok"


def test_health_answers_while_a_long_chat_is_prepared(server):
    """A 1,023-message chat is rendered and refused (context_length_exceeded) while /health keeps answering."""
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"第{i}句"} for i in range(1023)]
    answered, done = [], threading.Event()

    def poll():
        while not done.is_set():
            answered.append(httpx.get(server.url + "/health", timeout=30).status_code)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        r = post(server, "/v1/chat/completions", {**GOOD, "messages": msgs, "max_tokens": None})
    finally:
        done.set()
        poller.join()
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert answered and set(answered) == {200}


def test_prompts_are_prepared_off_the_event_loop():
    """Rendering, tokenizing and grammar compilation run in the preparation threads, so a long prompt
    never blocks the event loop (and with it /health and every other client)."""
    import asyncio

    from chinese_vicuna.serve.runtime import Server

    srv = Server(None, api_key=None, max_concurrency=1, max_queue=1, max_body_bytes=1 << 20)

    async def run():
        return threading.current_thread(), await srv.prepare(threading.current_thread)

    loop_thread, worker = asyncio.run(run())
    assert worker is not loop_thread and worker.name.startswith("prepare")


def test_sigterm_ends_streams_with_an_error_event(tmp_path, tiny_model_dir):
    cf = _serve_conftest()
    proc = cf.ServerProcess(["--model", str(tiny_model_dir)], tmp_path / "serve.log", cf._env(None)).ready()
    try:
        body = {**GOOD, "model": tiny_model_dir.name, "max_tokens": 400, "stream": True,
                "extra": None, "min_tokens": 400}
        lines: list[str] = []
        with httpx.stream("POST", proc.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 6:
                    proc.proc.send_signal(signal.SIGTERM)
        assert any('"error"' in line and "shutting down" in line for line in lines), lines[-3:]
        assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
        proc.proc.wait(60)
        assert proc.proc.returncode is not None
    finally:
        proc.stop()


@pytest.mark.slow
def test_smollm2_agents(tmp_path):
    """The same calls against the embedded SmolLM2 (its own chat template), plus embedding similarity."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    cf = _serve_conftest()
    proc = cf.ServerProcess([], tmp_path / "serve.log", cf._env(None)).ready(timeout=600)
    try:
        c = client(proc)
        name = base_name(proc)
        llm = ChatOpenAI(base_url=proc.url + "/v1", api_key="unused", model=name, temperature=0, max_tokens=80,
                         max_retries=0)
        for method in ("json_schema", "function_calling"):
            assert isinstance(llm.with_structured_output(Weather, method=method).invoke(Q), Weather)

        @tool
        def get_weather(city: Literal["北京", "上海"], unit: Literal["c", "f"]) -> str:
            """查询天气"""
            return "晴"

        msg = llm.bind_tools([get_weather], tool_choice="any").invoke(Q)
        jsonschema.validate(msg.tool_calls[0]["args"], WEATHER_PARAMS)
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": Q}], max_tokens=5,
                                      temperature=0, logprobs=True, top_logprobs=2)
        assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
        assert c.responses.create(model=name, input="你好", max_output_tokens=16, temperature=0).output_text
        vecs = torch.tensor([d.embedding for d in c.embeddings.create(
            model=name, input=["今天天气很好。", "今天的天气非常好。", "这台电脑的显卡坏了。"]).data])
        sims = vecs @ vecs.T
        assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2]
    finally:
        proc.stop()


def test_tool_call_arguments_stream_as_written():
    from chinese_vicuna.generation.constrain import OURS
    from chinese_vicuna.serve.replies import _Choice

    text = ' <tool_call>{"name":"get_weather","arguments":{"city":"北京","note":"}</x>"}}</tool_call>' \
           '<tool_call>{"name":"time","arguments":{}}</tool_call>'
    ch = _Choice("", strip=True, tools=OURS)
    deltas = []
    for piece in [text[i : i + 3] for i in range(0, len(text), 3)]:
        assert ch.push(piece) == ""
        deltas += ch.call_deltas()
    heads = [d for d in deltas if "id" in d]
    assert [(d["index"], d["function"]["name"]) for d in heads] == [(0, "get_weather"), (1, "time")]
    args = ["".join(d["function"]["arguments"] for d in deltas if d["index"] == k) for k in (0, 1)]
    assert args == ['{"city":"北京","note":"}</x>"}', "{}"]
    assert len([d for d in deltas if d["index"] == 0]) > 3  # really incremental
    calls = ch.calls()
    assert [c["function"]["arguments"] for c in calls] == args and [c["id"] for c in calls] == [d["id"] for d in heads]


@pytest.mark.slow  # the engine-level llama.cpp tests (tests/generation) cover each feature in the default run
def test_llamacpp_backend_server(tmp_path, tiny_model_dir, tiny_adapter_dir):
    """The same API on --backend llama.cpp: adapters per request, grammar, tools, logprobs; no embeddings."""
    from chinese_vicuna.tools.gguf import export_gguf

    gguf = export_gguf(str(tiny_model_dir), tmp_path / "tiny.gguf", gguf_type="f32")
    cf = _serve_conftest()
    args = ["--backend", "llama.cpp", "--model", str(gguf), "--adapter", f"a={tiny_adapter_dir}", "--n-ctx", "512"]
    proc = cf.ServerProcess(args, tmp_path / "serve.log", cf._env(None)).ready()
    try:
        c = client(proc)
        assert [m.id for m in c.models.list().data] == ["tiny", "a"]
        msgs = [{"role": "user", "content": Q}]
        tuned = c.chat.completions.create(model="a", messages=msgs, temperature=0, max_tokens=8).choices[0]
        base = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8).choices[0]
        assert tuned.message.content != base.message.content
        r = c.chat.completions.create(model="a", messages=msgs, temperature=0, max_tokens=80,
                                      response_format=_fmt(SCHEMA), logprobs=True, top_logprobs=2).choices[0]
        jsonschema.validate(json.loads(r.message.content), SCHEMA)
        assert len(r.logprobs.content) > 0 and all(len(e.top_logprobs) == 2 for e in r.logprobs.content)
        call = c.chat.completions.create(model="a", messages=msgs, tools=TOOLS, tool_choice="required", temperature=0,
                                         parallel_tool_calls=False, max_tokens=60).choices[0].message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
        assert c.responses.create(model="a", input=Q, max_output_tokens=4, temperature=0).usage.output_tokens <= 4
        bad = post(proc, "/v1/embeddings", {"model": "a", "input": "x"})
        assert bad.status_code == 400 and "--backend hf" in bad.json()["error"]["message"]
    finally:
        proc.stop()
