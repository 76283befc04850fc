"""The OpenAI wire format: request bodies -> ``Conversation``/``GenArgs``, events -> responses/chunks.

Unknown fields are ignored, as OpenAI does. The mapping decisions (also in the README):

- ``temperature`` 0 is greedy decoding; omitted means 1.0 with sampling (OpenAI's default).
  ``top_p`` defaults to 1.0, ``top_k`` to off and ``repetition_penalty`` to 1.0, so a plain
  OpenAI client gets plain OpenAI semantics (the CLI's 0.7/0.9/40/1.1 defaults do not apply).
- ``presence_penalty``/``frequency_penalty`` are additive logit penalties that the token iterator
  does not implement; any non-zero value is rejected (400) with a pointer to the
  ``repetition_penalty`` extension instead of being silently approximated.
- ``n`` > 1 with deterministic decoding (temperature 0 or beam search) returns ``n`` identical
  choices computed once; with sampling every choice is its own run (seed ``seed + i``).
- ``logprobs``, ``tools`` and non-text ``response_format`` are rejected (400): returning plain
  text instead would look like success to the client.
- ``max_tokens`` omitted: chat gets the rest of the context (as OpenAI), text completions 16 (as
  OpenAI's legacy endpoint). Prompt + ``max_tokens`` beyond the context is a 400 with the counts.
- A chat reply's leading whitespace is dropped (templates end in ``:`` or a newline), identically
  when streamed, so a stream always concatenates to the non-streamed reply.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.formats import Conversation, Message
from ..generation.decode import GenArgs

MAX_N = 16
"""Most choices per request (each sampled choice is a full generation)."""


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    # NaN/inf are valid Python JSON but no valid temperature; refuse them at the door.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(_Body):
    """Fields shared by chat and text completions (OpenAI's, then our extensions)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Extensions (vLLM uses the same names): the knobs of our token iterator.
    top_k: int | None = Field(None, ge=-1)
    num_beams: int | None = Field(None, ge=1, le=16)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    min_tokens: int | None = Field(None, ge=0)

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def requested_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise APIError(400, "stop: at most 16 stop sequences are supported", param="stop")
        return [s for s in stops if s]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


def parse_body(cls: type[_Body], data: Any) -> Any:
    """Validate a parsed JSON body; every problem becomes a 400 naming the parameter."""
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        # Drop pydantic's union-member tags ("str", "list[str]") so the path reads like the request's.
        path = [p for p in err["loc"] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
        param = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path).replace(".[", "[")
        if err["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.", param=param) from None
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}.", param=param) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def check_unsupported(req: _Sampling) -> None:
    """Refuse OpenAI features we would otherwise silently get wrong."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(
                400,
                f"{name} is not supported by this server (only 0). Use the extension field "
                "repetition_penalty instead (multiplicative, e.g. 1.1; 1.0 = off).",
                param=name,
            )
    if getattr(req, "logprobs", None):
        raise APIError(400, "logprobs are not supported by this server.", param="logprobs")
    if getattr(req, "tools", None):
        raise APIError(400, "Tool calling is not supported by this server.", param="tools")
    fmt = getattr(req, "response_format", None)
    if fmt and fmt.get("type", "text") != "text":
        raise APIError(400, "Only response_format {'type': 'text'} is supported.", param="response_format")


def _content_text(content: str | list[dict[str, Any]] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(
                400, f"messages[{i}].content[{j}]: only text content parts are supported.", param="messages"
            )
        parts.append(part["text"])
    return "".join(parts)


def to_conversation(messages: list[ChatMessage]) -> Conversation:
    """OpenAI messages -> a Conversation ending with the user's message.

    Leading system/developer messages become the system prompt (joined). Consecutive messages of
    one role are merged, because every template renders strict user/assistant alternation.
    """
    system: list[str] = []
    turns: list[Message] = []
    for i, m in enumerate(messages):
        text = _content_text(m.content, i)
        if m.role in ("system", "developer"):
            if turns:
                raise APIError(
                    400, f"messages[{i}]: system messages are only supported before the first user message.",
                    param="messages",
                )
            system.append(text)
        elif turns and turns[-1].role == m.role:
            turns[-1] = Message(m.role, turns[-1].content + "\n\n" + text)
        else:
            turns.append(Message(m.role, text))
    if not turns or turns[0].role != "user":
        raise APIError(400, "The first non-system message must be from the user.", param="messages")
    if turns[-1].role != "user":
        raise APIError(400, "The last message must be from the user (assistant prefill is not supported).",
                       param="messages")
    head = [Message("system", "\n\n".join(system))] if system else []
    return Conversation(head + turns, source="request")


def gen_args(req: _Sampling, max_new_tokens: int) -> GenArgs:
    """The decoding settings of one request (see the module docstring for the defaults)."""
    temperature = 1.0 if req.temperature is None else req.temperature
    min_tokens = req.min_tokens or 0
    if min_tokens > max_new_tokens:
        raise APIError(400, f"min_tokens ({min_tokens}) is larger than max_tokens ({max_new_tokens}).",
                       param="min_tokens")
    return GenArgs(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),  # vLLM spells "off" as -1, we as 0
        num_beams=req.num_beams or 1,
        repetition_penalty=req.repetition_penalty or 1.0,
        no_repeat_ngram_size=req.no_repeat_ngram_size or 0,
        length_penalty=1.0 if req.length_penalty is None else req.length_penalty,
        seed=req.seed,
    )


def prompt_ids(engine, prompt: str | list) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt of a text completion: strings, a token list, or a list of either."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    renderer, vocab = engine.renderer(), len(engine.tokenizer)
    out = []
    for p in prompt:
        if isinstance(p, str):
            text, ids = p, renderer.bos + renderer.encode(p)
        elif all(0 <= t < vocab for t in p):
            text, ids = engine.tokenizer.decode(p), list(p)
        else:
            raise APIError(400, f"Token ids in prompt must be in [0, {vocab}).", param="prompt")
        out.append((text, ids))
    if not out or not all(ids for _, ids in out):
        raise APIError(400, "The prompt must not be empty.", param="prompt")
    return out


def max_new_tokens(req: _Sampling, prompt_len: int, ctx: int, what: str, default: int | None = None) -> int:
    """``max_tokens`` for a prompt, checked against the context length ``ctx`` (OpenAI's wording)."""
    asked = req.requested_tokens
    if asked is None:
        if prompt_len < ctx:
            return min(default or ctx, ctx - prompt_len)
        msg = (f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in "
               f"{prompt_len} tokens. Please reduce the length of the {what}.")
    elif prompt_len + asked <= ctx:
        return asked
    else:
        msg = (f"This model's maximum context length is {ctx} tokens. However, you requested "
               f"{prompt_len + asked} tokens ({prompt_len} in the {what}, {asked} in the completion). "
               f"Please reduce the length of the {what} or completion.")
    raise APIError(400, msg, param=what, code="context_length_exceeded")


def sse(obj: Any) -> str:
    """One server-sent event, as OpenAI sends them."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Reply:
    """Turns generation events into OpenAI's response body or chunk stream (chat or text completion).

    Events: ``("delta", indices, text)``, ``("finish", indices, reason, tokens)``, ``("error", [], message)``.
    """

    def __init__(self, req: _Sampling, prompt_tokens: int, *, chat: bool, prefixes: list[str]):
        self.req, self.prompt_tokens, self.chat, self.prefixes = req, prompt_tokens, chat, prefixes
        self.n = len(prefixes)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._started: set[int] = set()

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model,
                "system_fingerprint": None}

    def _text(self, i: int, text: str) -> str:
        # Chat templates end with ':' or a newline and models answer " ..."; drop that leading space
        # (in both modes, so a stream concatenates to exactly the non-streamed reply).
        if not self.chat or i in self._started:
            return text
        text = text.lstrip()
        if text:
            self._started.add(i)
        return text

    async def collect(self, events: AsyncIterator[tuple]) -> dict:
        texts, finish, tokens = list(self.prefixes), [None] * self.n, 0
        async for kind, indices, *data in events:
            if kind == "error":
                raise APIError(500, data[0], type="server_error")
            for i in indices:
                if kind == "delta":
                    texts[i] += self._text(i, data[0])
                else:
                    finish[i], tokens = data[0], tokens + data[1]
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": choices, "usage": usage(self.prompt_tokens, tokens)}

    async def stream(self, events: AsyncIterator[tuple]) -> AsyncIterator[str]:
        with_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")

        def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
            if self.chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            # With include_usage, OpenAI sends "usage": null on every chunk but the last.
            return sse({**head, "choices": [choice], **({"usage": None} if with_usage else {})})

        tokens = 0
        for i, prefix in enumerate(self.prefixes):
            if self.chat:
                yield chunk(i, None, role=True)
            elif prefix:  # echo
                yield chunk(i, prefix)
        async for kind, indices, *data in events:
            if kind == "error":
                yield sse(APIError(500, data[0], type="server_error").body())
                break
            for i in indices:
                if kind == "finish":
                    tokens += data[1]
                    yield chunk(i, None, data[0])
                elif text := self._text(i, data[0]):
                    yield chunk(i, text)
        if with_usage:
            yield sse({**head, "choices": [], "usage": usage(self.prompt_tokens, tokens)})
        yield "data: [DONE]\n\n"
