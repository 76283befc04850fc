"""The OpenAI wire format: request bodies -> ``Conversation``/``GenArgs``/``Constraint``.

Unknown fields are ignored, as OpenAI does. The mapping decisions (also in the README):

- ``temperature`` 0 is greedy decoding; omitted means 1.0 with sampling (OpenAI's default).
  ``top_p`` defaults to 1.0, ``top_k`` to off and ``repetition_penalty`` to 1.0, so a plain
  OpenAI client gets plain OpenAI semantics (the CLI's 0.7/0.9/40/1.1 defaults do not apply).
- ``presence_penalty``/``frequency_penalty`` are additive logit penalties that the token iterator
  does not implement; any non-zero value is rejected (400) with a pointer to the
  ``repetition_penalty`` extension instead of being silently approximated. So are ``suffix`` and
  ``best_of`` > 1: returning something else would look like success to the client.
- ``n`` > 1 with deterministic decoding (temperature 0 or beam search) returns ``n`` identical
  choices computed once; with sampling every choice is its own run (seed ``seed + i``).
- ``response_format`` json_object / json_schema and ``tools`` constrain decoding with a grammar
  (``generation.constrain``); ``logprobs`` come from the distribution after penalties,
  ``logit_bias``, temperature and the grammar mask, before top-k/top-p truncation.
- ``max_tokens`` omitted: chat gets the rest of the context (as OpenAI), text completions 16 (as
  OpenAI's legacy endpoint). Prompt + ``max_tokens`` beyond the context is a 400 with the counts.
- A chat reply's leading whitespace is dropped (templates end in ``:`` or a newline), identically
  when streamed, so a stream always concatenates to the non-streamed reply.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.formats import Conversation, Message
from ..generation.constrain import Constraint, Tool, render_call, tool_prompt
from ..generation.decode import GenArgs

MAX_N = 16
"""Most choices per request (each sampled choice is a full generation)."""
MAX_MESSAGES = 1024
"""Most messages per chat request, checked before anything is rendered."""
MAX_DEPTH = 64
"""Deepest JSON nesting accepted in a request body (schemas included)."""
INT64 = 2**63 - 1
_NAME = r"^[A-Za-z0-9_-]{1,64}$"


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


class RequestBody(BaseModel):
    """Base of every request body: unknown fields ignored, NaN/inf refused."""

    # NaN/inf are valid Python JSON but no valid temperature; refuse them at the door.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class StreamOptions(RequestBody):
    include_usage: bool = False


class FunctionCall(RequestBody):
    name: str = Field(pattern=_NAME)
    arguments: str


class ToolCall(RequestBody):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(RequestBody):
    name: str = Field(pattern=_NAME)
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(RequestBody):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(RequestBody):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _Sampling(RequestBody):
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
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64 - MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    response_format: ResponseFormat | None = None
    # Extensions (vLLM uses the same names): the knobs of our token iterator.
    top_k: int | None = Field(None, ge=-1, le=INT64)
    num_beams: int | None = Field(None, ge=1, le=16)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    length_penalty: float | None = Field(None, ge=-10, le=10)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=INT64)
    min_tokens: int | None = Field(None, ge=0, le=INT64)

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

    def top_logprobs_count(self) -> int | None:
        """How many alternatives per token the reply lists (None: no logprobs)."""
        return None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def top_logprobs_count(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (a recursive walk would overflow on hostile input)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict | list):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _bad_string(obj: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) that is not valid Unicode (a lone surrogate)."""
    stack = [(obj, path)]
    while stack:
        o, p = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                return p or "body"
        elif isinstance(o, dict):
            for k, v in o.items():
                stack.append((k, p))
                stack.append((v, f"{p}.{k}" if p else str(k)))
        elif isinstance(o, list):
            stack.extend((v, f"{p}[{i}]") for i, v in enumerate(o))
    return None


def parse_body(cls: type[RequestBody], data: Any) -> Any:
    """Validate a parsed JSON body; every problem becomes a 400 naming the parameter."""
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.")
    if _depth(data) > MAX_DEPTH:
        raise APIError(400, f"The request body is nested more than {MAX_DEPTH} levels deep.")
    if (where := _bad_string(data)) is not None:
        raise APIError(400, f"Invalid value for '{where}': the string is not valid Unicode (lone surrogate).",
                       param=where)
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


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal['none','auto','required']",
              "NamedToolChoice"}


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
    if getattr(req, "suffix", None):
        raise APIError(400, "suffix (insertion) is not supported by this server.", param="suffix")
    if (getattr(req, "best_of", None) or 1) > 1:
        raise APIError(400, "best_of is not supported by this server; use n.", param="best_of")
    special = req.logit_bias or req.top_logprobs_count() is not None or constraint(req) is not None
    if special and (req.num_beams or 1) > 1:
        raise APIError(400, "num_beams > 1 cannot be combined with logprobs, logit_bias, response_format or tools.",
                       param="num_beams")


def constraint(req: _Sampling) -> Constraint | None:
    """The grammar the reply must match: from ``response_format``, or from ``tools`` + ``tool_choice``."""
    tools = getattr(req, "tools", None) or []
    choice = getattr(req, "tool_choice", None)
    fmt = req.response_format
    if tools and choice != "none":
        if fmt is not None and fmt.type != "text":
            raise APIError(400, "response_format cannot be combined with tools.", param="response_format")
        defs = tuple(Tool(t.function.name, t.function.parameters or {"type": "object", "properties": {}},
                          t.function.description) for t in tools)
        if isinstance(choice, NamedToolChoice):
            defs = tuple(t for t in defs if t.name == choice.function.name)
            if not defs:
                raise APIError(400, f"tool_choice: no tool named '{choice.function.name}' in tools.",
                               param="tool_choice")
        required = choice == "required" or isinstance(choice, NamedToolChoice)
        parallel = getattr(req, "parallel_tool_calls", None) is not False
        return Constraint("tools", tools=defs, required=required, parallel=parallel)
    if choice is not None and choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools.", param="tool_choice")
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required for type json_schema.",
                       param="response_format.json_schema.schema")
    return Constraint("json", fmt.json_schema.schema_)


def content_text(content: str | list[dict[str, Any]] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.get("type") not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
            raise APIError(
                400, f"messages[{i}].content[{j}]: only text content parts are supported.", param="messages"
            )
        parts.append(part["text"])
    return "".join(parts)


def call_arguments(m: ChatMessage, i: int) -> list[tuple[ToolCall, Any]]:
    """Each of an assistant message's calls with its parsed arguments (400 if they are not JSON)."""
    out = []
    for j, call in enumerate(m.tool_calls or []):
        try:
            out.append((call, json.loads(call.function.arguments)))
        except ValueError:
            raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON.",
                           param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
    return out


def _assistant_text(m: ChatMessage, i: int) -> str:
    text = content_text(m.content, i)
    calls = [render_call(call.function.name, args) for call, args in call_arguments(m, i)]
    return "\n".join(([text] if text else []) + calls)


def check_tool_reply(m: ChatMessage, i: int, call_ids) -> None:
    """A ``tool`` message must name (``tool_call_id``) a call of an earlier assistant message."""
    if not m.tool_call_id:
        raise APIError(400, f"messages[{i}]: a tool message needs tool_call_id.", param=f"messages[{i}].tool_call_id")
    if m.tool_call_id not in call_ids:
        raise APIError(400, f"messages[{i}].tool_call_id '{m.tool_call_id}' answers no earlier "
                       "assistant tool call.", param=f"messages[{i}].tool_call_id")


def to_conversation(messages: list[ChatMessage], tools: tuple[Tool, ...] = (),
                    default_system: str = "") -> tuple[Conversation, str]:
    """OpenAI messages -> (a Conversation ending with a user message, the assistant prefill).

    Leading system/developer messages become the system prompt (joined); a later one is given to
    the model as part of the next user turn. ``tool`` messages are user turns holding
    ``<tool_response>`` blocks; assistant ``tool_calls`` are written back as the model writes
    them. Consecutive messages of one role are merged, because every template renders strict
    user/assistant alternation. A last assistant message is a prefill the reply continues.
    With ``tools``, our tool prompt is appended to the system prompt (``default_system`` if none).
    """
    system: list[str] = []
    turns: list[Message] = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant":
            role, text = "assistant", _assistant_text(m, i)
            call_ids.update(c.id for c in m.tool_calls or [])
        elif m.role == "tool":
            check_tool_reply(m, i, call_ids)
            role, text = "user", f"<tool_response>{content_text(m.content, i)}</tool_response>"
        else:
            role, text = ("system" if m.role == "developer" else m.role), content_text(m.content, i)
        if role == "system" and not turns:
            system.append(text)
            continue
        role = "user" if role == "system" else role
        if turns and turns[-1].role == role:
            turns[-1] = Message(role, turns[-1].content + "\n\n" + text)
        else:
            turns.append(Message(role, text))
    if not turns or turns[0].role != "user":
        raise APIError(400, "The first non-system message must be from the user.", param="messages")
    prefill = ""
    if turns[-1].role == "assistant":
        prefill = turns.pop().content
    if tools:
        system = ["\n\n".join(system) if system else default_system, tool_prompt(tools)]
        system = [s for s in system if s]
    head = [Message("system", "\n\n".join(system))] if system else []
    return Conversation(head + turns, source="request"), prefill


def gen_args(req: _Sampling, max_new_tokens: int, vocab: int, cons: Constraint | None = None) -> GenArgs:
    """The decoding settings of one request (see the module docstring for the defaults)."""
    temperature = 1.0 if req.temperature is None else req.temperature
    min_tokens = req.min_tokens or 0
    if min_tokens > max_new_tokens:
        raise APIError(400, f"min_tokens ({min_tokens}) is larger than max_tokens ({max_new_tokens}).",
                       param="min_tokens")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise APIError(400, f"logit_bias: '{key}' is not a token id in [0, {vocab}).", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of {key} must be in [-100, 100].", param="logit_bias")
        bias[int(key)] = value
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
        logit_bias=bias or None,
        logprobs=req.top_logprobs_count(),
        constraint=cons,
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
