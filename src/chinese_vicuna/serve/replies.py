"""Generation events -> OpenAI response bodies and SSE chunks (chat, text completions, Responses).

Events (from ``openai_api.Job``): ``("delta", indices, text, logprobs)``, ``("finish", indices,
reason, tokens)``, ``("error", [], message)``. ``logprobs`` is a list of OpenAI chat-shaped
entries (``token``, ``logprob``, ``bytes``, ``top_logprobs``) for the tokens behind the text.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..generation.constrain import CallFormat, parse_tool_calls
from .schemas import APIError


def sse(obj: Any, event: str | None = None) -> str:
    """One server-sent event, as OpenAI sends them (Responses events also name the event)."""
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(entries: list[dict], offset: int) -> dict:
    """The legacy completions shape: parallel lists, with text offsets from ``offset``."""
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _call_head(fmt: CallFormat) -> re.Pattern:
    """A call's start up to its arguments, as the model writes it (the name captured)."""
    return re.compile(r"\s*" + re.escape(f'{fmt.open}{fmt.pre}{{"name"{fmt.key_sep}"') + r"([A-Za-z0-9_-]{1,64})"
                      + re.escape(f'"{fmt.item_sep}"{fmt.args_key}"{fmt.key_sep}'))


class _Choice:
    """One choice's text, held back while it may still turn out to be a tool call.

    ``tools``: the call format of the request's tools, or None (no tools).
    """

    def __init__(self, prefix: str, strip: bool, tools: CallFormat | None):
        self.fmt = tools
        self.text, self.strip, self.tools = prefix, strip, tools is not None
        self.open = (self.fmt.open or "{") if self.fmt else ""
        """What a reply that is a call starts with."""
        self.head = _call_head(self.fmt) if self.fmt else None
        self.end = "}" + self.fmt.post + self.fmt.close if self.fmt and self.fmt.close else ""
        """What ends a call (bare JSON: the reply's end, a closing brace held back until then)."""
        self.held = ""
        self.mode = "text" if not self.tools else "undecided"
        self.finish: str | None = None
        self.logprobs: list[dict] = []
        self.streamed: list[dict] = []
        """Calls announced in a stream so far: id, name, where the arguments start, what was sent."""
        self._pos = 0

    def call_deltas(self) -> list[dict]:
        """Streaming: ``tool_calls`` delta entries for what the model has written since the last call.

        A call is announced (id, name) once its name is complete; its arguments then follow as
        they are written, holding back only what could be the closing ``}</tool_call>``.
        """
        out = []
        while True:
            cur = self.streamed[-1] if self.streamed and self.streamed[-1]["open"] else None
            if cur is None:
                m = self.head.match(self.held, self._pos)
                if m is None:
                    return out
                cur = {"id": f"call_{uuid.uuid4().hex[:24]}", "name": m.group(1), "start": m.end(), "sent": "",
                       "open": True}
                self.streamed.append(cur)
                out.append({"index": len(self.streamed) - 1, "id": cur["id"], "type": "function",
                            "function": {"name": cur["name"], "arguments": ""}})
            body = self.held[cur["start"] :]
            end = body.find(self.end) if self.end else -1
            ready = body[:end] if end >= 0 else body[: max(0, len(body) - len(self.end or "}"))]
            if len(ready) > len(cur["sent"]) and ready.startswith(cur["sent"]):
                out.append({"index": len(self.streamed) - 1, "function": {"arguments": ready[len(cur["sent"]) :]}})
                cur["sent"] = ready
            if end < 0:
                return out
            cur["open"] = False
            self._pos = cur["start"] + end + len(self.end)

    def push(self, delta: str) -> str:
        """Text that may be shown now."""
        if self.strip:  # drop the reply's leading whitespace (templates end with ':' or a newline)
            delta = delta.lstrip()
            self.strip = not delta
        if self.mode == "undecided":
            self.held += delta
            head = self.held.lstrip()
            if head.startswith(self.open):
                self.mode = "calls"
                return ""
            if not head or self.open.startswith(head):
                return ""
            self.mode, delta, self.held = "text", self.held, ""
        elif self.mode == "calls":
            self.held += delta
            return ""
        self.text += delta
        return delta

    def calls(self) -> list[dict] | None:
        """At the end: the parsed calls (OpenAI shape), or None after putting held text back."""
        parsed = parse_tool_calls(self.held, self.fmt) if self.held else None
        if parsed is None:
            self.text += self.held
            self.held = ""
            return None
        head, calls = parsed
        self.text += head
        ids = [c["id"] for c in self.streamed] + [f"call_{uuid.uuid4().hex[:24]}" for _ in calls]
        return [{"id": ids[k], "type": "function", "function": {"name": c["name"], "arguments": c["raw"]}}
                for k, c in enumerate(calls)]


class Reply:
    """Turns generation events into OpenAI's response body or chunk stream (chat or text completion)."""

    def __init__(self, req, prompt_tokens: int, *, chat: bool, prefixes: list[str],
                 tools: CallFormat | None = None, strip: bool = True):
        self.req, self.prompt_tokens, self.chat = req, prompt_tokens, chat
        self.choices = [_Choice(p, chat and strip, tools if chat else None) for p in prefixes]
        self.n = len(prefixes)
        self.logprobs = req.top_logprobs_count() is not None
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model,
                "system_fingerprint": None}

    def _lp(self, i: int, entries: list[dict], offset: int = 0) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": entries, "refusal": None} if self.chat else _completion_logprobs(entries, offset)

    async def collect(self, events: AsyncIterator[tuple]) -> dict:
        tokens = 0
        async for kind, indices, *data in events:
            if kind == "error":
                raise APIError(data[1] if len(data) > 1 else 500, data[0], type="server_error")
            for i in indices:
                ch = self.choices[i]
                if kind == "delta":
                    ch.push(data[0])
                    ch.logprobs += data[1]
                else:
                    ch.finish, tokens = data[0], tokens + data[1]
        out = []
        for i, ch in enumerate(self.choices):
            calls = ch.calls() if ch.tools else None
            if self.chat:
                msg: dict[str, Any] = {"role": "assistant", "content": ch.text if calls is None else (ch.text or None),
                                       "refusal": None}
                if calls:
                    msg["tool_calls"] = calls
                finish = "tool_calls" if calls and ch.finish == "stop" else ch.finish
                out.append({"index": i, "message": msg, "logprobs": self._lp(i, ch.logprobs), "finish_reason": finish})
            else:
                out.append({"index": i, "text": ch.text, "logprobs": self._lp(i, ch.logprobs),
                            "finish_reason": ch.finish})
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": out, "usage": usage(self.prompt_tokens, tokens)}

    async def stream(self, events: AsyncIterator[tuple]) -> AsyncIterator[str]:
        with_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")

        def chunk(i: int, delta: dict | str | None, finish: str | None = None, lp: list[dict] | None = None,
                  offset: int = 0) -> str:
            logprobs = self._lp(i, lp or [], offset) if lp is not None else None
            if self.chat:
                choice = {"index": i, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": i, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
            # With include_usage, OpenAI sends "usage": null on every chunk but the last.
            return sse({**head, "choices": [choice], **({"usage": None} if with_usage else {})})

        tokens = 0
        for i, ch in enumerate(self.choices):
            if self.chat:
                yield chunk(i, {"role": "assistant", "content": ""})
            elif ch.text:  # echo
                yield chunk(i, ch.text)
        async for kind, indices, *data in events:
            if kind == "error":
                yield sse(APIError(500, data[0], type="server_error").body())
                break
            for i in indices:
                ch = self.choices[i]
                if kind == "finish":
                    tokens += data[1]
                    finish = data[0]
                    if ch.mode != "text":  # held back: tool calls, or text that began like one
                        calls = ch.calls()
                        if calls:  # what the stream has not sent yet
                            for k, c in enumerate(calls):
                                fn = c["function"]
                                sent = ch.streamed[k]["sent"] if k < len(ch.streamed) else None
                                if sent is None:
                                    yield chunk(i, {"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                                                    "function": {"name": fn["name"], "arguments": ""}}]})
                                    sent = ""
                                if len(fn["arguments"]) > len(sent) and fn["arguments"].startswith(sent):
                                    rest = fn["arguments"][len(sent) :]
                                    yield chunk(i, {"tool_calls": [{"index": k, "function": {"arguments": rest}}]})
                            finish = "tool_calls" if finish == "stop" else finish
                        elif ch.text:
                            yield chunk(i, {"content": ch.text})
                    yield chunk(i, None, finish)
                    continue
                before = len(ch.text)
                text = ch.push(data[0])
                if ch.mode == "calls":
                    for entry in ch.call_deltas():
                        yield chunk(i, {"tool_calls": [entry]})
                    continue
                if ch.mode != "text":
                    continue  # held: maybe a tool call
                lp = data[1] if self.logprobs else None
                if text or lp:
                    yield chunk(i, ({"content": text} if self.chat else text), lp=lp, offset=before)
        if with_usage:
            yield sse({**head, "choices": [], "usage": usage(self.prompt_tokens, tokens)})
        yield "data: [DONE]\n\n"


class ResponsesReply:
    """The same events in the Responses API's shapes: a ``response`` object, or its event stream."""

    def __init__(self, model: str, prompt_tokens: int, *, tools: CallFormat | None, strip: bool,
                 instructions: str | None, max_output_tokens: int | None):
        self.model, self.prompt_tokens = model, prompt_tokens
        self.choice = _Choice("", strip, tools)
        self.instructions, self.max_output_tokens = instructions, max_output_tokens
        self.id = f"resp_{uuid.uuid4().hex}"
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tokens = 0
        self.seq = 0

    def _response(self, status: str, output: list[dict], incomplete: str | None = None) -> dict:
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output, "error": None,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "metadata": {},
                "text": {"format": {"type": "text"}}, "temperature": None, "top_p": None,
                "usage": {"input_tokens": self.prompt_tokens, "output_tokens": self.tokens,
                          "total_tokens": self.prompt_tokens + self.tokens,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}}

    def _message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def _final(self, finish: str | None) -> dict:
        calls = self.choice.calls() if self.choice.tools else None
        output = [self._message(self.choice.text)] if self.choice.text or not calls else []
        for c in calls or []:
            output.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": c["id"],
                           "name": c["function"]["name"], "arguments": c["function"]["arguments"],
                           "status": "completed"})
        incomplete = "max_output_tokens" if finish == "length" else None
        return self._response("incomplete" if incomplete else "completed", output, incomplete)

    async def collect(self, events: AsyncIterator[tuple]) -> dict:
        finish = None
        async for kind, _, *data in events:
            if kind == "error":
                raise APIError(data[1] if len(data) > 1 else 500, data[0], type="server_error")
            if kind == "delta":
                self.choice.push(data[0])
            else:
                finish, self.tokens = data[0], self.tokens + data[1]
        return self._final(finish)

    def _event(self, name: str, **fields) -> str:
        self.seq += 1
        return sse({"type": name, "sequence_number": self.seq - 1, **fields}, event=name)

    async def stream(self, events: AsyncIterator[tuple]) -> AsyncIterator[str]:
        yield self._event("response.created", response=self._response("in_progress", []))
        yield self._event("response.in_progress", response=self._response("in_progress", []))
        opened = False
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}

        def open_message() -> list[str]:
            return [self._event("response.output_item.added", output_index=0, item=self._message("", "in_progress")),
                    self._event("response.content_part.added", item_id=self.msg_id, output_index=0, content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []})]

        finish = None
        async for kind, _, *data in events:
            if kind == "error":
                yield self._event("error", code="server_error", message=data[0], param=None)
                self.choice.text = ""
                yield self._event("response.failed", response={**self._response("failed", []),
                                                               "error": {"code": "server_error", "message": data[0]}})
                return
            if kind == "finish":
                finish, self.tokens = data[0], self.tokens + data[1]
                continue
            text = self.choice.push(data[0])
            if text:
                if not opened:
                    opened = True
                    for e in open_message():
                        yield e
                yield self._event("response.output_text.delta", delta=text, logprobs=[], **where)
        final = self._final(finish)
        index = 0
        for item in final["output"]:
            if item["type"] == "message":
                if not opened:
                    for e in open_message():
                        yield e
                    if item["content"][0]["text"]:
                        yield self._event("response.output_text.delta", delta=item["content"][0]["text"],
                                          logprobs=[], **where)
                text = item["content"][0]["text"]
                yield self._event("response.output_text.done", text=text, logprobs=[], **where)
                yield self._event("response.content_part.done", item_id=self.msg_id, output_index=0, content_index=0,
                                  part=item["content"][0])
                yield self._event("response.output_item.done", output_index=index, item=item)
            else:
                yield self._event("response.output_item.added", output_index=index, item={**item, "arguments": ""})
                yield self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                  delta=item["arguments"])
                yield self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  arguments=item["arguments"])
                yield self._event("response.output_item.done", output_index=index, item=item)
            index += 1
        name = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield self._event(name, response=final)
