"""Request bodies of /v1/responses and /v1/embeddings.

A Responses request is served as the chat request it means (``chat_body``): ``instructions``
becomes the system message, ``input`` the messages (text, message items, ``function_call`` and
``function_call_output`` items), ``text.format`` the ``response_format`` and ``tools`` the chat
tools, so both endpoints share one validation, prompt and decoding path. Nothing is stored:
``previous_response_id`` and ``store: true`` retrieval are refused rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .schemas import MAX_MESSAGES, APIError, RequestBody

_PASS = ("model", "temperature", "top_p", "stream", "seed", "top_k", "repetition_penalty", "min_tokens",
         "parallel_tool_calls", "logit_bias")


class ResponsesRequest(RequestBody):
    model: str
    input: str | list[dict[str, Any]] = Field(max_length=MAX_MESSAGES)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None


def _content(content: Any, i: int) -> Any:
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        raise APIError(400, f"input[{i}].content must be a string or a list of parts.", param=f"input[{i}].content")
    return [{"type": "text", "text": p.get("text")} if isinstance(p, dict) else p for p in content]


def _messages(req: ResponsesRequest) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return msgs + [{"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind == "message":
            msgs.append({"role": item.get("role"), "content": _content(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if msgs and msgs[-1]["role"] == "assistant" and "tool_calls" in msgs[-1]:
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": out if isinstance(out, str) else _content(out, i)})
        elif kind != "reasoning":
            raise APIError(400, f"input[{i}].type '{kind}' is not supported (message, function_call, "
                           "function_call_output).", param=f"input[{i}].type")
    return msgs


def chat_body(req: ResponsesRequest) -> dict:
    """The chat completions body this Responses request means."""
    if req.previous_response_id:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                       "whole conversation as input.", param="previous_response_id")
    body: dict[str, Any] = {k: getattr(req, k) for k in _PASS if getattr(req, k) is not None}
    body["messages"] = _messages(req)
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    fmt = (req.text or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif fmt is not None:
        body["response_format"] = fmt
    if req.tools:
        body["tools"] = [{"type": t.get("type"), "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                               "strict") if k in t}}
                         for t in req.tools]
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        body["tool_choice"] = choice
    return body


class EmbeddingRequest(RequestBody):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def inputs(self, vocab: int) -> list[str | list[int]]:
        """Texts or token-id lists, one per embedding (at most 256)."""
        items = self.input
        if isinstance(items, str) or (items and all(isinstance(t, int) for t in items)):
            items = [items]
        if not items or len(items) > 256:
            raise APIError(400, "input: between 1 and 256 inputs per request.", param="input")
        for i, x in enumerate(items):
            if not x:
                raise APIError(400, f"input[{i}] is empty.", param="input")
            if isinstance(x, list) and not all(0 <= t < vocab for t in x):
                raise APIError(400, f"input[{i}]: token ids must be in [0, {vocab}).", param="input")
        return list(items)
