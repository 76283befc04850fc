"""Records of every supported format -> one ``Conversation`` type.

Formats: ``alpaca`` (instruction/input/output), ``vicuna-chat`` (Chinese-Vicuna's
``{"input": [...], "output": [...]}``), ``sharegpt`` (``conversations`` with ``from``/``value``),
``openai`` (``messages`` with ``role``/``content``) and ``text`` (raw text for pre-training).
Every problem is reported as ``file:line: field: what was expected``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "text"]
FORMATS = ("alpaca", "vicuna-chat", "sharegpt", "openai", "text")


class RecordError(ValueError):
    """One bad record: where it is, which field, and what was expected."""

    def __init__(self, where: str, field_name: str, expected: str):
        self.where, self.field_name, self.expected = where, field_name, expected
        super().__init__(f"{where}: {field_name}: {expected}")


@dataclass
class Message:
    role: Role
    content: str
    context: str = ""
    """Alpaca's ``input`` block, kept apart so the alpaca template can render it as ``### Input:``."""


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""
    """``file:line`` of the record, for error messages and rejects."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None

    @property
    def turns(self) -> list[Message]:
        return [m for m in self.messages if m.role != "system"]

    def key(self) -> tuple:
        """Identity for deduplication: roles and texts, whitespace-normalised."""
        return tuple((m.role, " ".join(m.content.split()), " ".join(m.context.split())) for m in self.messages)


def detect_format(record: Any, where: str) -> str:
    """Name the format of one record from its keys."""
    if not isinstance(record, dict):
        raise RecordError(where, "record", f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record:
        return "alpaca"
    if isinstance(record.get("input"), list) or isinstance(record.get("output"), list):
        return "vicuna-chat"
    if "text" in record:
        return "text"
    raise RecordError(
        where,
        "record",
        "expected keys of a known format: instruction/input/output (alpaca), input+output lists "
        f"(vicuna-chat), conversations (sharegpt), messages (openai) or text; got {sorted(record)}",
    )


def string_field(record: dict, key: str, where: str, optional: bool = False) -> str:
    """``record[key]`` as a string (``""`` when optional and missing); a ``RecordError`` otherwise."""
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise RecordError(where, key, "missing; expected a string")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(where, key, f"expected a string, got {type(value).__name__}")
    return value


def nonempty(value: str, where: str, key: str) -> str:
    """``value`` unchanged, or a ``RecordError`` if it is blank."""
    if not value.strip():
        raise RecordError(where, key, "expected non-empty text")
    return value


def alpaca_messages(r: dict, where: str) -> list[Message]:
    """An alpaca record (instruction, input?, output) as user + assistant messages."""
    instruction = nonempty(string_field(r, "instruction", where), where, "instruction")
    context = string_field(r, "input", where, optional=True)
    output = nonempty(string_field(r, "output", where), where, "output")
    msgs = []
    if isinstance(r.get("system"), str) and r["system"].strip():
        msgs.append(Message("system", r["system"]))
    # BELLE/Guanaco-style history: [[q, a], ...] before the current instruction.
    for i, pair in enumerate(r.get("history") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError(where, f"history[{i}]", "expected a [question, answer] pair of strings")
        msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
    return msgs + [Message("user", instruction, context), Message("assistant", output)]


def _vicuna_chat(r: dict, where: str) -> list[Message]:
    ins, outs = r.get("input"), r.get("output")
    for key, value in (("input", ins), ("output", outs)):
        if not isinstance(value, list) or not value:
            raise RecordError(where, key, "expected a non-empty list of strings")
        for i, v in enumerate(value):
            if not isinstance(v, str) or not v.strip():
                raise RecordError(where, f"{key}[{i}]", "expected a non-empty string")
    if len(ins) != len(outs):
        raise RecordError(
            where, "input/output", f"expected lists of equal length, got {len(ins)} inputs and {len(outs)} outputs"
        )
    msgs = []
    for q, a in zip(ins, outs):
        msgs += [Message("user", q), Message("assistant", a)]
    return msgs


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def role_messages(items: Any, where: str, key: str, role_key: str, text_key: str, roles: dict) -> list[Message]:
    """A list of ``{role_key, text_key}`` dicts (ShareGPT / OpenAI) as messages, roles mapped by ``roles``."""
    if not isinstance(items, list) or not items:
        raise RecordError(where, key, "expected a non-empty list of messages")
    msgs = []
    for i, m in enumerate(items):
        f = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(where, f, "expected an object")
        role = m.get(role_key)
        if role not in roles:
            raise RecordError(where, f"{f}.{role_key}", f"expected one of {sorted(roles)}, got {role!r}")
        text = m.get(text_key)
        if not isinstance(text, str):
            raise RecordError(where, f"{f}.{text_key}", f"expected a string, got {type(text).__name__}")
        if roles[role] == "system" and i != 0:
            raise RecordError(where, f"{f}.{role_key}", "a system message is only allowed first")
        msgs.append(Message(roles[role], text))
    turns = [m for m in msgs if m.role != "system"]
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise RecordError(where, key, f"expected alternating user/assistant turns starting with user; turn {i} is {m.role}")
    if not turns or turns[-1].role != "assistant":
        raise RecordError(where, key, "expected the conversation to end with an assistant reply")
    return msgs


def to_conversation(record: Any, fmt: str, where: str) -> Conversation:
    """Convert one parsed record to a Conversation.

    Args:
        record: the parsed JSON object (or ``{"text": ...}`` for raw text).
        fmt: one of FORMATS, or ``auto`` to detect it from the keys.
        where: ``file:line`` for error messages.

    Raises:
        RecordError: the record does not match the format.
    """
    if fmt == "auto":
        fmt = detect_format(record, where)
    if not isinstance(record, dict):
        raise RecordError(where, "record", f"expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        msgs = alpaca_messages(record, where)
    elif fmt == "vicuna-chat":
        msgs = _vicuna_chat(record, where)
    elif fmt == "sharegpt":
        msgs = role_messages(record.get("conversations"), where, "conversations", "from", "value", SHAREGPT_ROLES)
    elif fmt == "openai":
        roles = {"system": "system", "user": "user", "assistant": "assistant"}
        msgs = role_messages(record.get("messages"), where, "messages", "role", "content", roles)
    elif fmt == "text":
        msgs = [Message("text", nonempty(string_field(record, "text", where), where, "text"))]
    else:
        raise RecordError(where, "format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return Conversation(msgs, source=where)
