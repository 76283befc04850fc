"""Constrained decoding: the reply must match a JSON schema or our tool-call grammar.

The grammar engine is llguidance (the Earley/lexer engine behind Guidance and llama.cpp's
``%llguidance``): it compiles a JSON schema or a Lark grammar against the tokenizer and, at each
step, gives the set of token ids that keep the output valid. Our token iterator masks everything
else to ``-inf`` before sampling, so greedy and sampled replies alike always parse (unless cut by
``max_tokens``). The llama.cpp backend applies the same matcher in its logits processor (its own
``LlamaGrammar.from_json_schema`` ignores ``minimum``/``maximum`` and similar keywords, so its
replies can break the schema).

Tool calls are written as ``<tool_call>{"name":..,"arguments":{..}}</tool_call>`` (the Hermes /
Qwen convention); ``TOOL_PROMPT`` tells a model so when its template has no tool support.
"""

from __future__ import annotations

import json
import weakref
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
class Constraint:
    """What the reply must be: JSON (``schema`` None = any object), or tool calls (``tools``)."""

    kind: Literal["json", "tools"]
    schema: dict | None = None
    tools: tuple[Tool, ...] = ()
    required: bool = False
    """tools: a call is mandatory (``tool_choice`` required or a named function); else text or calls."""
    parallel: bool = True
    """tools: several calls may follow each other."""

    def call_schema(self) -> dict:
        """The JSON schema of one call's object: ``{"name": one of the tools, "arguments": its parameters}``."""
        alts = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters or {"type": "object"}},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
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
    schema = json.dumps({"x-guidance": _COMPACT, **closed(c.call_schema())}, ensure_ascii=False)
    # at most two whitespace characters around calls: a weak model must not loop on blanks
    calls = r"calls: /\s{0,2}/ call (/\s{0,2}/ call)*" if c.parallel else r"calls: /\s{0,2}/ call"
    start = "start: calls" if c.required else "start: TEXT | calls"
    # A text reply is anything that does not begin with '<' (after whitespace): the model commits
    # to text or to a call with its first visible character.
    return "\n".join([start, calls, f'call: "{CALL_OPEN}" %json{schema} "{CALL_CLOSE}"', r"TEXT: /\s{0,2}[^<\s][\s\S]*/"])


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


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]] | None:
    """``(text before the calls, [{"name", "arguments"}...])`` if the reply is tool calls, else None.

    A last call cut off by ``max_tokens`` is dropped when complete ones precede it.
    """
    if CALL_OPEN not in text:
        return None
    head, _, rest = text.partition(CALL_OPEN)
    pieces = (CALL_OPEN + rest).split(CALL_OPEN)[1:]
    calls = []
    for k, piece in enumerate(pieces):
        body, closed_, _ = piece.partition(CALL_CLOSE)
        try:
            obj = json.loads(body) if closed_ else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            if k == len(pieces) - 1 and calls:
                break
            return None
        args = obj.get("arguments", {})
        # the arguments as the model wrote them (what a stream sends), if that text is exactly them
        raw = body.split('"arguments":', 1)[-1].strip()[:-1].strip() if body.rstrip().endswith("}") else ""
        try:
            same = json.loads(raw) == args
        except ValueError:
            same = False
        calls.append({"name": obj["name"], "arguments": args,
                      "raw": raw if same else json.dumps(args, ensure_ascii=False)})
    return head.strip(), calls


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
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":")) + CALL_CLOSE
