"""The OpenAI-compatible server end to end: a real ``chinese-vicuna serve`` process on 127.0.0.1,
driven by the ``openai`` client, LangChain and raw HTTP (concurrency, errors, auth, queue, disconnects).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from chinese_vicuna.data.formats import Conversation, Message
from chinese_vicuna.data.templates import get_template
from chinese_vicuna.data.tokenize import Renderer

QUESTION = "天空为什么是蓝色的？"


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def base_name(server) -> str:
    return client(server).models.list().data[0].id


def chat_prompt_tokens(tokenizer, *messages: Message) -> int:
    """The ids the model is fed: the adapter's alpaca template, segment by segment."""
    return len(Renderer(tokenizer, get_template("alpaca")).prompt_ids(Conversation(list(messages))))


def test_models_and_health(api_server):
    assert httpx.get(api_server.url + "/health").json()["status"] == "ok"
    models = client(api_server).models.list().data
    assert [m.id for m in models][1:] == ["a"] and models[1].parent == models[0].id
    assert client(api_server).models.retrieve("a").id == "a"


def test_chat_base_vs_adapter_stream_and_usage(api_server, tokenizer):
    c = client(api_server)
    msgs = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": QUESTION}]
    kw = dict(messages=msgs, temperature=0, max_tokens=12, extra_body={"min_tokens": 12})
    base = c.chat.completions.create(model=base_name(api_server), **kw)
    tuned = c.chat.completions.create(model="a", **kw)
    assert base.choices[0].message.content != tuned.choices[0].message.content
    assert tuned.choices[0].finish_reason == "length" and tuned.object == "chat.completion"
    want = chat_prompt_tokens(tokenizer, Message("system", msgs[0]["content"]), Message("user", QUESTION))
    assert (tuned.usage.prompt_tokens, tuned.usage.completion_tokens, tuned.usage.total_tokens) == (want, 12, want + 12)

    chunks = list(c.chat.completions.create(model="a", stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == tuned.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == want


def test_chat_stop_n_and_seed(api_server):
    c = client(api_server)
    kw = dict(model="a", messages=[{"role": "user", "content": QUESTION}], max_tokens=16,
              extra_body={"min_tokens": 16})
    full = c.chat.completions.create(temperature=0, **kw).choices[0].message.content
    # a whitespace-free piece from the middle (leading whitespace of a chat reply is dropped)
    stop = next(full[i : i + 3] for i in range(len(full) // 2, len(full) - 3) if not any(map(str.isspace, full[i : i + 3])))
    cut = c.chat.completions.create(temperature=0, stop=[stop, "never-there"], **kw).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"

    greedy = c.chat.completions.create(temperature=0, n=3, **kw)  # deterministic: n identical choices
    assert [ch.message.content for ch in greedy.choices] == [full] * 3 and greedy.usage.completion_tokens == 48
    sampled = [c.chat.completions.create(temperature=1.0, n=2, seed=7, **kw) for _ in range(2)]
    assert [ch.message.content for ch in sampled[0].choices] == [ch.message.content for ch in sampled[1].choices]
    assert sampled[0].choices[0].message.content != sampled[0].choices[1].message.content


def test_completions(api_server, tokenizer):
    c = client(api_server)
    prompt = "从前有座山，山里有座庙，"
    kw = dict(model="a", temperature=0, max_tokens=10, extra_body={"min_tokens": 10})
    one = c.completions.create(prompt=prompt, **kw)
    assert one.object == "text_completion" and one.choices[0].finish_reason == "length"
    assert one.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert one.usage.completion_tokens == 10
    text = one.choices[0].text
    assert "".join(ch.choices[0].text for ch in c.completions.create(prompt=prompt, stream=True, **kw)) == text
    two = c.completions.create(prompt=[prompt, "Once upon a time"], **kw)
    assert [ch.index for ch in two.choices] == [0, 1] and two.choices[0].text == text
    assert c.completions.create(prompt=prompt, echo=True, **kw).choices[0].text == prompt + text
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert c.completions.create(prompt=ids, **kw).choices[0].text == text
    assert c.completions.create(prompt=prompt, model="a", temperature=0).usage.completion_tokens <= 16  # default


def test_langchain_invoke_and_stream(api_server):
    from langchain_openai import ChatOpenAI

    expected = client(api_server).chat.completions.create(
        model="a", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12
    ).choices[0].message.content
    llm = ChatOpenAI(model="a", base_url=api_server.url + "/v1", api_key="unused", temperature=0, max_tokens=12,
                     max_retries=0, timeout=60)
    assert llm.invoke(QUESTION).content == expected
    assert "".join(chunk.content for chunk in llm.stream(QUESTION)) == expected


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_bad_requests_then_good(api_server):
    url = api_server.url + "/v1/chat/completions"
    good = {"model": "a", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0}
    long_text = "天空为什么是蓝色的" * 200
    cases = [  # (body, status, param or None, text in the message)
        (b"{not json", 400, None, "parse the JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        ({"model": "a"}, 400, "messages", "Missing required parameter"),
        ({**good, "messages": "hi"}, 400, "messages", "valid list"),
        ({**good, "messages": []}, 400, "messages", ""),
        ({**good, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", ""),
        ({**good, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id", "needs"),
        ({**good, "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "x", "tool_call_id": "c1"}]},
         400, "messages[1].tool_call_id", "answers no earlier"),
        ({**good, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", ""),
        ({**good, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", "first"),
        ({**good, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
         400, "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
        ({**good, "model": "nope"}, 404, "model", "does not exist"),
        ({**good, "temperature": 3}, 400, "temperature", ""),
        ({**good, "temperature": "hot"}, 400, "temperature", ""),
        ({**good, "top_p": 0}, 400, "top_p", ""),
        ({**good, "max_tokens": 0}, 400, "max_tokens", ""),
        ({**good, "n": 0}, 400, "n", ""),
        ({**good, "stop": 7}, 400, "stop", ""),
        ({**good, "presence_penalty": 0.5}, 400, "presence_penalty", "repetition_penalty"),
        ({**good, "frequency_penalty": 1}, 400, "frequency_penalty", "repetition_penalty"),
        ({**good, "min_tokens": 9}, 400, "min_tokens", ""),
        ({**good, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs", ""),
        ({**good, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
        ({**good, "tools": [{"type": "function"}]}, 400, "tools[0].function", "Missing"),
        ({**good, "max_tokens": 600}, 400, "messages", "maximum context length is 512 tokens"),
        ({**good, "messages": [{"role": "user", "content": long_text}], "max_tokens": None},
         400, "messages", "resulted in"),
    ]
    for body, status, param, text in cases:
        r = httpx.post(url, content=body if isinstance(body, bytes) else json.dumps(body), timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = _error(r)
        assert err["param"] == param and text in err["message"], (body, err)
    too_long = httpx.post(url, json={**good, "messages": [{"role": "user", "content": long_text}]}).json()["error"]
    n_prompt = int(too_long["message"].split("(")[1].split(" ")[0])  # "... (N in the messages, 4 in ...)"
    assert n_prompt > 512 and too_long["code"] == "context_length_exceeded"
    r = httpx.post(url, content=b"{" + b" " * (2 << 20) + b"}", timeout=30, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    assert httpx.post(api_server.url + "/v1/completions", json={"model": "a", "prompt": []}).status_code == 400
    assert _error(httpx.get(api_server.url + "/v1/nothing-here"))["type"] == "invalid_request_error"
    ok = httpx.post(url, json={**good, "user": "x", "some_future_field": {"a": 1}}, timeout=30)  # unknown: ignored
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] and api_server.alive()


def _parse_stream(raw: str, chat: bool) -> tuple[str, dict]:
    """Check one SSE body is well-formed OpenAI; return its text and usage."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    body, usage = [c for c in chunks if c["choices"]], chunks[-1]["usage"]
    if chat:
        assert body[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in body[1:])
    else:
        text = "".join(c["choices"][0]["text"] for c in body)
    assert body[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    return text, usage


@pytest.mark.parametrize("count", [32, pytest.param(128, marks=pytest.mark.slow)])
def test_concurrent_streams(api_server, count):
    """``count`` simultaneous streams (chat and completions, base and adapter): all complete, well-formed,
    each equal to the non-streamed greedy answer."""
    base = base_name(api_server)
    prompts = ["你好", "天空为什么是蓝色的？", "写一首关于秋天的诗。", "What is 2 + 2?"]
    combos = [(model, chat, p) for model in (base, "a") for chat in (True, False) for p in prompts]

    def body(model, chat, prompt, stream):
        common = {"model": model, "temperature": 0, "max_tokens": 24, "stream": stream,
                  "stream_options": {"include_usage": True}}
        return (("/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}) if chat
                else ("/v1/completions", {**common, "prompt": prompt}))

    async def run() -> tuple[list, list, float]:
        limits = httpx.Limits(max_connections=count + 8)
        async with httpx.AsyncClient(base_url=api_server.url, limits=limits, timeout=120) as http:
            refs = []
            for combo in combos:
                path, payload = body(*combo, stream=False)
                r = (await http.post(path, json=payload)).json()["choices"][0]
                refs.append(r["message"]["content"] if combo[1] else r["text"])

            async def one(i: int) -> tuple[str, dict]:
                path, payload = body(*combos[i % len(combos)], stream=True)
                async with http.stream("POST", path, json=payload) as r:
                    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                    raw = (await r.aread()).decode()
                return _parse_stream(raw, combos[i % len(combos)][1])

            start = time.perf_counter()
            results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), timeout=240)
            return refs, results, time.perf_counter() - start

    refs, results, elapsed = asyncio.run(run())
    for i, (text, _) in enumerate(results):
        assert text == refs[i % len(combos)], (i, combos[i % len(combos)])
    tokens = sum(u["completion_tokens"] for _, u in results)
    print(f"\n{count} concurrent streams: {elapsed:.2f}s, {tokens} tokens, {tokens / elapsed:.0f} tokens/s")
    assert api_server.health()["waiting"] == 0


def test_auth(busy_server):
    url, key = busy_server.url, busy_server.api_key
    assert httpx.get(url + "/health").status_code == 200
    assert _error(httpx.get(url + "/v1/models"))["code"] == "invalid_api_key"
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": key}):
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
    bad = httpx.post(url + "/v1/chat/completions", json={"model": "a"}, headers={"Authorization": "Bearer x"})
    assert bad.status_code == 401  # auth is checked before the body
    with pytest.raises(openai.AuthenticationError):
        client(busy_server, "wrong").models.list()
    assert [m.id for m in client(busy_server, key).models.list().data][1:] == ["a"]


def _raw_request(server, body: dict) -> socket.socket:
    """Send a chat request on a bare socket (closing it is a client disconnect)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (server.api_key.encode(), len(data), data))
    return s


def _until(server, pred, timeout: float = 60) -> tuple[dict, float]:
    start = time.monotonic()
    while not pred(h := server.health()):
        assert time.monotonic() - start < timeout, h
        time.sleep(0.02)
    return h, time.monotonic() - start


# One generation of seconds (8 beams x 450 forced tokens, ~4 s here): if a disconnect did not stop the
# token loop itself, it would end as "completed" with all 450 tokens.
LONG = {"temperature": 0, "max_tokens": 450, "min_tokens": 450, "num_beams": 8}


def test_queue_full_and_disconnects(busy_server):
    """--max-concurrency 1 --max-queue 1: the third request gets 429 at once; a queued client that leaves
    frees its place; a streaming client that leaves stops its generation (counted as cancelled, with
    fewer tokens than asked) and frees the slot; the next request is answered."""
    c = client(busy_server, busy_server.api_key)
    msgs = [{"role": "user", "content": QUESTION}]
    h0 = busy_server.health()
    long = c.chat.completions.create(model="a", messages=msgs, stream=True, extra_body=LONG)
    first = next(iter(long))
    assert first.choices[0].delta.role == "assistant"
    _until(busy_server, lambda h: h["active"] == 1)
    queued = _raw_request(busy_server, {"model": "a", "messages": msgs, "max_tokens": 4})
    _until(busy_server, lambda h: h["waiting"] == 1)

    r = httpx.post(busy_server.url + "/v1/chat/completions", json={"model": "a", "messages": msgs},
                   headers={"Authorization": f"Bearer {busy_server.api_key}"}, timeout=30)
    # refused at once: the long generation still runs and the queued request still waits
    assert r.status_code == 429 and busy_server.health()["active"] == 1 and busy_server.health()["waiting"] == 1
    assert _error(r)["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="a", messages=msgs, max_tokens=4)

    queued.close()
    _until(busy_server, lambda h: h["waiting"] == 0)
    long.close()
    h, took = _until(busy_server, lambda h: h["active"] == 0)
    assert h["cancelled"] == h0["cancelled"] + 1 and h["completed"] == h0["completed"]
    assert h["generated_tokens"] - h0["generated_tokens"] < 450, (h, h0)
    reply = c.chat.completions.create(model="a", messages=msgs, max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason
    print(f"\nslot freed {took * 1000:.0f} ms after the disconnect; "
          f"{h['generated_tokens'] - h0['generated_tokens']} of 450 tokens generated")


def test_non_streamed_disconnect_cancels(busy_server):
    h0 = busy_server.health()
    s = _raw_request(busy_server, {"model": "a", "messages": [{"role": "user", "content": QUESTION}], **LONG})
    _until(busy_server, lambda h: h["active"] == 1)
    s.close()
    h, _ = _until(busy_server, lambda h: h["active"] == 0)
    assert h["cancelled"] == h0["cancelled"] + 1 and h["generated_tokens"] - h0["generated_tokens"] < 450


# --- in-process units: CLI wiring, vLLM command line, admission, planning, message mapping ----------


def test_vllm_command_and_env():
    import sys

    from chinese_vicuna.cli import build_parser
    from chinese_vicuna.serve.commands import VLLM_MODULE, vllm_command, vllm_env

    argv = ["serve", "--engine", "vllm", "--model", "/models/llama-7b", "--adapter", "zh=/ad/zh", "--adapter",
            "/ad/med", "--port", "9000", "--max-concurrency", "4", "--api-key", "k", "--gpu-memory-utilization", "0.8"]
    args, extra = build_parser().parse_known_args(argv)
    assert vllm_command(args, extra) == [
        sys.executable, "-m", VLLM_MODULE, "--model", "/models/llama-7b", "--served-model-name", "llama-7b",
        "--enable-lora", "--max-loras", "2", "--lora-modules", "zh=/ad/zh", "med=/ad/med",
        "--host", "127.0.0.1", "--port", "9000", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.8",
    ]
    assert vllm_env("k", {}) == {"VLLM_API_KEY": "k"} and vllm_env(None, {"A": "1"}) == {"A": "1"}
    args, _ = build_parser().parse_known_args(["serve", "--engine", "vllm", "--model", "m"])
    assert "--enable-lora" not in vllm_command(args) and "--max-num-seqs" not in vllm_command(args)


def test_vllm_exec_or_clear_error(monkeypatch, capsys):
    import importlib.util
    import os

    from chinese_vicuna.cli import main
    from chinese_vicuna.serve.commands import VLLM_MODULE

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(["serve", "--engine", "vllm", "--model", "/m"]) == 2
    assert "pip install vllm" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    monkeypatch.setenv("CHINESE_VICUNA_API_KEY", "from-env")
    assert main(["serve", "--engine", "vllm", "--model", "/m", "--port", "9001"]) == 0
    (argv, env), = calls
    assert argv[1:3] == ["-m", VLLM_MODULE] and "9001" in argv and env["VLLM_API_KEY"] == "from-env"
    assert "from-env" not in argv


def test_serve_flag_errors(monkeypatch, capsys):
    from chinese_vicuna.cli import build_parser, main
    from chinese_vicuna.serve.commands import _api_key

    assert main(["serve", "--no-such-flag"]) == 2 and "no-such-flag" in capsys.readouterr().err
    assert main(["serve", "--backend", "llama.cpp", "--model", "/m"]) == 2
    assert "llama.cpp" in capsys.readouterr().err
    monkeypatch.setenv("CHINESE_VICUNA_API_KEY", "env-key")
    assert _api_key(build_parser().parse_args(["serve"])) == "env-key"
    assert _api_key(build_parser().parse_args(["serve", "--api-key", "flag-key"])) == "flag-key"
    args = build_parser().parse_args(["serve", "--n-ctx", "1024", "--n-gpu-layers", "-1", "--cors-origins", "a,b"])
    assert (args.n_ctx, args.n_gpu_layers, args.cors_origins) == (1024, -1, "a,b")
    assert main(["serve", "--n-ctx", "1024"]) == 2  # an hf backend has no n_ctx to set
    assert "llama.cpp settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--n-ctx", "0"])
    assert "positive" in capsys.readouterr().err


def test_admission_queue():
    from chinese_vicuna.serve.openai_api import Admission
    from chinese_vicuna.serve.schemas import APIError

    async def go():
        adm = Admission(concurrency=1, queue=2)
        a, b, c = adm.enter(), adm.enter(), adm.enter()
        assert a.done() and not b.done() and adm.waiting == 2
        with pytest.raises(APIError) as full:
            adm.enter()
        assert full.value.status == 429
        adm.leave(b)  # a queued client leaves
        assert adm.waiting == 1 and adm.enter() is not None  # its place is free again
        adm.leave(a)  # the slot passes to the next waiter in order
        assert c.done() and adm.active == 1

    asyncio.run(go())


def test_plan_and_messages():
    from chinese_vicuna.generation.decode import GenArgs
    from chinese_vicuna.serve.openai_api import plan
    from chinese_vicuna.serve.schemas import APIError, ChatMessage, to_conversation

    greedy = plan([[1, 2], [3]], GenArgs(do_sample=False), 3)
    assert [t.indices for t in greedy] == [[0, 1, 2], [3, 4, 5]]
    sampled = plan([[1]], GenArgs(do_sample=True, seed=5), 2)
    assert [(t.indices, t.gen.seed) for t in sampled] == [([0], 5), ([1], 6)]
    msgs = [ChatMessage(role=r, content=c) for r, c in
            [("developer", "S"), ("user", "a"), ("user", [{"type": "text", "text": "b"}]), ("assistant", "x"),
             ("user", "c")]]
    conv, prefill = to_conversation(msgs)
    assert prefill == ""
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "S"), ("user", "a\n\nb"), ("assistant", "x"), ("user", "c")]
    # a later system message goes to the model with the next user turn; a last assistant message is a prefill
    late = msgs[:2] + [ChatMessage(role="system", content="late"), ChatMessage(role="user", content="d"),
                       ChatMessage(role="assistant", content="The answer is")]
    conv, prefill = to_conversation(late)
    assert [(m.role, m.content) for m in conv.messages] == [("system", "S"), ("user", "a\n\nlate\n\nd")]
    assert prefill == "The answer is"
    with pytest.raises(APIError):
        to_conversation([ChatMessage(role="assistant", content="x")])
