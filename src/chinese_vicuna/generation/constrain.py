"""Constrained decoding: the reply must match a JSON schema or our tool-call grammar.

The grammar engine is llguidance (the Earley/lexer engine behind Guidance and llama.cpp's
``%llguidance``): it compiles a JSON schema or a Lark grammar against the tokenizer and, at each
step, gives the set of token ids that keep the output valid. Our token iterator masks everything
else to ``-inf`` before sampling, so greedy and sampled replies alike always parse (unless cut by
``max_tokens``). The llama.cpp backend applies the same matcher in its logits processor (its own
``LlamaGrammar.from_json_schema`` ignores ``minimum``/``maximum`` and similar keywords, so its
replies can break the schema).

Tool calls are written in a ``CallFormat``: ours is ``<tool_call>{"name":..,"arguments":{..}}</tool_call>``
(the Hermes / Qwen convention), which ``TOOL_PROMPT`` teaches a model whose template has no tool
support; a model's own tool-aware chat template teaches its own, which ``detect_call_format`` reads
from the template's render of a probe call (Hermes/Qwen ``<tool_call>`` blocks, Llama-3.1 bare JSON).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_COMPACT = {"whitespace_flexible": False}
"""No free whitespace between JSON tokens: a weak model cannot loop on spaces, and replies are short."""


class ConstraintError(ValueError):
    """A schema or tool definition the grammar engine cannot compile (the message says which part)."""


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class CallFormat:
    """How a reply writes one tool call: ``open + pre + {"name": .., ARGS: {..}} + post + close``.

    ``open`` empty: the call is a bare JSON object that is the whole reply (Llama 3.1/3.2), one call
    per reply. Otherwise calls are tagged blocks, several allowed. The separators are those of the
    JSON the template writes (``tojson`` writes ``", "``/``": "``), so a model sees its own format.
    """

    open: str = CALL_OPEN
    close: str = CALL_CLOSE
    pre: str = ""
    post: str = ""
    args_key: str = "arguments"
    item_sep: str = ","
    key_sep: str = ":"
    kind: str = "ours"
    """``ours`` (our tool prompt), ``tagged`` or ``json`` (a chat template's own)."""
    name_first: bool = True
    """``name`` before the arguments (Hermes-2-Pro writes the arguments first)."""

    @property
    def multi(self) -> bool:
        """Several calls may follow each other in one reply."""
        return bool(self.open)

    def write(self, name: str, arguments: Any) -> str:
        """One call, as the model writes it."""
        obj = {"name": name, self.args_key: arguments} if self.name_first else {self.args_key: arguments, "name": name}
        body = json.dumps(obj, ensure_ascii=False, separators=(self.item_sep, self.key_sep))
        return self.open + self.pre + body + self.post + self.close


OURS = CallFormat()
"""The format our tool prompt teaches."""


@dataclass(frozen=True)
class Constraint:
    """What the reply must be: JSON (``schema`` None = any object), or tool calls (``tools``)."""

    kind: Literal["json", "tools"]
    schema: dict | None = None
    tools: tuple[Tool, ...] = ()
    required: bool = False
    """tools: a call is mandatory (``tool_choice`` required or a named function); else text or calls."""
    parallel: bool = True
    """tools: several calls may follow each other (where the format allows it)."""
    format: CallFormat = OURS
    """tools: how calls are written."""

    def call_schema(self) -> dict:
        """The JSON schema of one call's object: ``{"name": one of the tools, "arguments": its parameters}``."""
        key, first = self.format.args_key, self.format.name_first
        alts = []
        for t in self.tools:  # the grammar writes the properties in this order
            props = [("name", {"const": t.name}), (key, t.parameters or {"type": "object"})][:: 1 if first else -1]
            alts.append({"type": "object", "properties": dict(props), "required": [k for k, _ in props],
                         "additionalProperties": False})
        return alts[0] if len(alts) == 1 else {"anyOf": alts}

    def json_schema(self) -> dict:
        return self.schema if self.schema is not None else {"type": "object"}


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` wherever an object lists ``properties`` and says nothing.

    Undeclared keys are valid JSON-schema-wise, but a grammar that allows them lets a weak model
    invent keys until ``max_tokens``; emitting only the declared ones still validates (and is what
    OpenAI's strict mode requires anyway).
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("const", "enum", "default", "examples") else closed(v)) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _lark(c: Constraint) -> str:
    """The llguidance grammar text of a constraint (Lark syntax with ``%json`` for schema parts)."""
    if c.kind == "json":
        return _matcher_cls().grammar_from_json_schema(closed(c.json_schema()), defaults=_COMPACT)
    f = c.format
    guidance = _COMPACT if f == OURS else {**_COMPACT, "item_separator": f.item_sep, "key_separator": f.key_sep}
    schema = json.dumps({"x-guidance": guidance, **closed(c.call_schema())}, ensure_ascii=False)
    # at most two whitespace characters around calls: a weak model must not loop on blanks
    multi = c.parallel and f.multi
    calls = r"calls: /\s{0,2}/ call (/\s{0,2}/ call)*" if multi else r"calls: /\s{0,2}/ call"
    start = "start: calls" if c.required else "start: TEXT | calls"
    if f.open:
        call = f"call: {_literal(f.open + f.pre)} %json{schema} {_literal(f.post + f.close)}"
    else:
        call = f"call: %json{schema}"
    # A text reply is anything that does not begin like a call ('<', or '{' for bare JSON calls)
    # after whitespace: the model commits to text or to a call with its first visible character.
    first = re.escape((f.open or "{")[0])
    return "\n".join([start, calls, call, rf"TEXT: /\s{{0,2}}[^{first}\s][\s\S]*/"])


def _literal(text: str) -> str:
    """A Lark string literal (llguidance reads JSON-style escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _matcher_cls():
    """llguidance's LLMatcher, imported when first needed (its native library loads in ~50 ms)."""
    from llguidance import LLMatcher

    return LLMatcher


_LLTOK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer, n_vocab: int, eos: list[int]):
    """llguidance's view of a transformers fast tokenizer (built once per tokenizer: ~0.3 s)."""
    key = (n_vocab, tuple(eos))
    cached = _LLTOK.get(tokenizer)
    if cached is None or cached[0] != key:
        import llguidance.hf

        try:
            llt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(eos) or None)
        except ValueError as e:
            raise ConstraintError(f"constrained decoding needs a fast tokenizer: {e}") from None
        cached = (key, llt)
        _LLTOK[tokenizer] = cached
    return cached[1]


def compile_grammar(c: Constraint, llt) -> str:
    """The grammar for ``c``, checked against the tokenizer; ConstraintError names what fails."""
    cls = _matcher_cls()
    try:
        grammar = _lark(c)
    except (ValueError, TypeError) as e:
        raise ConstraintError(str(e)) from None
    err = cls.validate_grammar(grammar, llt)
    if err:
        raise ConstraintError(err.strip().splitlines()[0])
    return grammar


class Matcher:
    """One row's grammar state: ``mask(scores)`` before sampling, ``advance(token)`` after."""

    def __init__(self, grammar: str, llt, eos: list[int]):
        self.m = _matcher_cls()(llt, grammar, log_level=0)
        if self.m.is_error():
            raise ConstraintError(self.m.get_error())
        self.eos = eos

    def mask(self, scores: torch.Tensor) -> None:
        """Set every token the grammar forbids to -inf (in place, one row)."""
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[: scores.shape[-1]].astype(bool))
        if self.m.is_error() or not allowed.any():
            allowed = torch.zeros_like(allowed)
            allowed[self.eos[:1]] = True  # nothing valid can follow: end the reply
        scores.masked_fill_(~allowed.to(scores.device), float("-inf"))

    def advance(self, token: int) -> None:
        if token not in self.eos:
            self.m.consume_token(token)


def parse_tool_calls(text: str, fmt: CallFormat = OURS) -> tuple[str, list[dict[str, Any]]] | None:
    """``(text before the calls, [{"name", "arguments", "raw"}...])`` if the reply is tool calls, else None.

    ``raw`` is the arguments' JSON as the model wrote it. A last tagged call cut off by
    ``max_tokens`` is dropped when complete ones precede it.
    """
    if not fmt.open:  # a bare JSON call is the whole reply
        body = text.strip()
        call = _call(body, fmt) if body.startswith("{") else None
        return ("", [call]) if call else None
    if fmt.open not in text:
        return None
    head, _, rest = text.partition(fmt.open)
    pieces = (fmt.open + rest).split(fmt.open)[1:]
    calls = []
    for k, piece in enumerate(pieces):
        body, closed_, _ = piece.partition(fmt.close)
        call = _call(body, fmt) if closed_ else None
        if call is None:
            if k == len(pieces) - 1 and calls:
                break
            return None
        calls.append(call)
    return head.strip(), calls


def _call(body: str, fmt: CallFormat) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(fmt.args_key, {})
    # the arguments as the model wrote them (what a stream sends), if that text is exactly them
    raw = body.split(f'"{fmt.args_key}":', 1)[-1].strip()[:-1].strip() if body.rstrip().endswith("}") else ""
    try:
        same = json.loads(raw) == args
    except ValueError:
        same = False
    return {"name": obj["name"], "arguments": args, "raw": raw if same else json.dumps(args, ensure_ascii=False)}


_PROBE_NAME = "probe_function"
_PROBE_ARGS = {"city": "probe_city", "days": 7}
_TAGGED = re.compile(r"(<[^<>\s]+>)(\s*)(\{.*\})(\s*)(</[^<>\s]+>)", re.S)


def detect_call_format(render: Callable[[list[dict], list[dict] | None, bool], str], end: str) -> CallFormat | None:
    """The call format a tool-aware chat template teaches, or None when it is not one we recognise.

    ``render(messages, tools, add_generation_prompt)`` renders with the template (raising
    ``ValueError`` when it cannot); ``end`` is what the template writes after a reply. A probe
    conversation with one assistant tool call is rendered, and the text between the generation
    prompt and ``end`` is what the model must write for that call: a ``<tag>{json}</tag>`` block
    (Hermes, Qwen2.5, Qwen3) or a bare JSON object (Llama 3.1/3.2), with the template's JSON keys,
    their order and separators. Writing it back from the detected format must give that very text.
    """
    params = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": _PROBE_NAME, "description": "probe", "parameters": params}}]
    user = {"role": "user", "content": "\ue003"}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call_probe", "function": {"name": _PROBE_NAME, "arguments": dict(_PROBE_ARGS)}}]}
    result = {"role": "tool", "tool_call_id": "call_probe", "name": _PROBE_NAME, "content": "\ue004"}
    try:
        head = render([user], tools, True)
    except ValueError:
        return None
    # Followed by a tool result first: a template may render its last assistant message otherwise
    # (Qwen3 adds an empty <think> block to it).
    for msgs in ([user, call, result], [user, call]):
        try:
            full = render(msgs, tools, len(msgs) == 3)
        except ValueError:
            continue
        at = full.find(end, len(head)) if end and full.startswith(head) else -1
        if at >= 0 and (fmt := _read_format(full[len(head) : at].strip())) is not None:
            return fmt
    return None


def _read_format(text: str) -> CallFormat | None:
    m = _TAGGED.fullmatch(text)
    if m is not None:
        open_, pre, body, post, close = m.groups()
        if close != "</" + open_[1:]:
            return None
    elif text.startswith("{"):
        open_ = pre = post = close = ""
        body = text
    else:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    keys = list(obj) if isinstance(obj, dict) else []
    if len(keys) != 2 or "name" not in keys or obj["name"] != _PROBE_NAME:
        return None
    args_key = keys[1] if keys[0] == "name" else keys[0]
    if obj[args_key] != _PROBE_ARGS:
        return None
    for item, key in ((", ", ": "), (",", ":")):
        fmt = CallFormat(open_, close, pre, post, args_key, item, key, "tagged" if open_ else "json", keys[0] == "name")
        if fmt.write(_PROBE_NAME, _PROBE_ARGS) == text:
            return fmt
    return None


TOOL_PROMPT = (
    "You can call the following functions. Each is given as JSON (name, description, parameters "
    "as a JSON schema):\n{tools}\n\nTo call a function, reply with nothing but one "
    f'{CALL_OPEN}{{"name":"NAME","arguments":{{...}}}}{CALL_CLOSE} per call. A function\'s result '
    "comes back to you as <tool_response>...</tool_response>. If no function is needed, answer normally."
)
"""Our tool prompt, appended to the system prompt when a request has ``tools``."""


def tool_prompt(tools: tuple[Tool, ...]) -> str:
    lines = [json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                        ensure_ascii=False) for t in tools]
    return TOOL_PROMPT.replace("{tools}", "\n".join(lines))


def render_call(name: str, arguments: Any) -> str:
    """An assistant's earlier call, written back into the history as the model would have written it."""
    return OURS.write(name, arguments)
