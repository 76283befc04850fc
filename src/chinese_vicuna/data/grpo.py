"""Prompt-only records for ``stage: grpo``: a prompt for the policy to answer, and fields for the rewards.

Formats, detected per record from its keys:

- alpaca: ``{"instruction", "input"?, "system"?, "history"?}`` (an ``output``, if any, is kept as a field);
- ShareGPT: ``{"conversations": [...ending with the user]}`` (+ optional ``system``);
- OpenAI: ``{"messages": [...ending with the user]}``;
- TRL: ``{"prompt": "text" | [messages ending with the user]}``.

Every other field of the record (``answer``, ``key``, ...) travels with the prompt and is passed to
the reward functions by name, as TRL's ``GRPOTrainer`` passes its dataset columns. The prompt that
reward functions see is TRL's: the message list for conversational records (and the completion as
``[{"role": "assistant", "content": ...}]``), else the prompt text (alpaca: instruction, then input).
Every problem is reported as ``file:line: field: what was expected``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .datasets import DataError, Source, read_sources, report_rejects, split
from .formats import Conversation, Message, RecordError, alpaca_messages
from .preference import SHAREGPT_ROLES, alternating_messages, prompt_messages
from .tokenize import Renderer

PROMPT_KEYS = ("prompt", "completion", "completion_ids")
"""Names TRL reserves: not passed to reward functions as record fields."""


@dataclass
class PromptRecord:
    prompt: list[Message]
    reward_prompt: Any
    """The prompt as reward functions receive it: text, or a list of ``{"role", "content"}`` messages."""
    fields: dict[str, Any]
    source: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.reward_prompt, list)


@dataclass
class PromptSample:
    """A tokenized prompt (the generation prompt of the template) with its record."""

    prompt_ids: list[int]
    record: PromptRecord

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


@dataclass
class PreparedPrompts:
    train: list[PromptSample]
    val: list[PromptSample]
    stats: dict[str, Any] = field(default_factory=dict)


def _as_dicts(msgs: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in msgs]


def to_prompt(record: Any, where: str, fmt: str = "auto") -> PromptRecord:
    """One parsed record -> its prompt and reward fields; RecordError naming the field otherwise."""
    if not isinstance(record, dict):
        raise RecordError(where, "record", f"expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        if "prompt" in record:
            fmt = "trl"
        elif "messages" in record:
            fmt = "openai"
        elif "conversations" in record:
            fmt = "sharegpt"
        elif "instruction" in record:
            fmt = "alpaca"
        else:
            raise RecordError(where, "record", "expected a prompt: prompt (TRL), messages (OpenAI), conversations "
                              f"(ShareGPT) or instruction/input (alpaca), each ending with the user; got keys {sorted(record)}")
    fields = {k: v for k, v in record.items() if k not in PROMPT_KEYS}
    if fmt == "trl":
        value = record.get("prompt")
        msgs = prompt_messages(value, where, "prompt")
        return PromptRecord(msgs, value if isinstance(value, str) else _as_dicts(msgs), fields, where)
    if fmt == "openai":
        msgs = prompt_messages(record.get("messages"), where, "messages")
        return PromptRecord(msgs, _as_dicts(msgs), fields, where)
    if fmt == "sharegpt":
        conv = record.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise RecordError(where, "conversations", "expected a non-empty list of messages ending with the user")
        msgs = [Message("system", record["system"])] if isinstance(record.get("system"), str) and record["system"].strip() else []
        for i, m in enumerate(conv):
            key = f"conversations[{i}]"
            if not isinstance(m, dict) or m.get("from") not in SHAREGPT_ROLES or not isinstance(m.get("value"), str):
                raise RecordError(where, key, f"expected {{\"from\": one of {sorted(SHAREGPT_ROLES)}, \"value\": text}}")
            msgs.append(Message(SHAREGPT_ROLES[m["from"]], m["value"]))
        turns = [m for m in msgs if m.role != "system"]
        if not turns or turns[-1].role != "user":
            raise RecordError(where, "conversations", "expected the conversation to end with the user (GRPO samples the reply)")
        alternating_messages(turns, where, "conversations")
        return PromptRecord(msgs, _as_dicts(msgs), fields, where)
    if fmt == "alpaca":
        r = dict(record)
        r["output"] = "-"  # alpaca_messages's reply slot; the policy writes the reply
        msgs = alpaca_messages(r, where)[:-1]
        last = msgs[-1]
        text = last.content + (f"\n{last.context}" if last.context.strip() else "")
        return PromptRecord(msgs, text if len(msgs) == 1 else _as_dicts(msgs), fields, where)
    raise RecordError(where, "format", f"expected one of auto, trl, openai, sharegpt, alpaca; got {fmt!r}")


def _key(rec: PromptRecord) -> tuple:
    msgs = tuple((m.role, " ".join(m.content.split()), " ".join(m.context.split())) for m in rec.prompt)
    return msgs + (json.dumps(rec.fields, sort_keys=True, ensure_ascii=False, default=str),)


def prepare_prompts(
    renderer: Renderer,
    sources: list[Source],
    *,
    val_size: float = 0.0,
    seed: int = 42,
    dedup: bool = True,
    on_bad_record: str = "error",
    max_samples: int | None = None,
    rejects_path: str | None = None,
    progress: bool = True,
) -> PreparedPrompts:
    """Records -> tokenized generation prompts, split into train/validation, with statistics.

    A prompt longer than ``renderer.cutoff_len`` tokens is dropped (``overlong: drop``) or keeps its
    last ``cutoff_len`` tokens (``truncate``); the completion adds up to ``max_new_tokens`` more.
    """
    del progress  # tokenizing prompts is quick

    def convert(record, where, src):
        return [to_prompt(record, where, {"openai": "openai", "sharegpt": "sharegpt", "alpaca": "alpaca"}.get(src.format, "auto"))]

    records, rejects, duplicates = read_sources(sources, convert, _key, on_bad_record, dedup, seed)
    report_rejects(rejects, rejects_path)
    samples: list[PromptSample] = []
    dropped = truncated = 0
    for rec in records:
        ids = renderer.prompt_ids(Conversation(list(rec.prompt), source=rec.source))
        if len(ids) > renderer.cutoff_len:
            if renderer.overlong == "drop":
                dropped += 1
                continue
            ids, truncated = ids[-renderer.cutoff_len :], truncated + 1
        samples.append(PromptSample(ids, rec))
    if not samples:
        raise DataError("no prompts left after tokenization (all dropped)")
    train, val = split(samples, val_size, seed)
    if max_samples:
        train = train[:max_samples]
    stats = {
        "records": len(records),
        "duplicates_removed": duplicates,
        "rejected": len(rejects),
        "truncated": truncated,
        "dropped_overlong": dropped,
        "train_prompts": len(train),
        "val_prompts": len(val),
        "max_prompt_len": max((s.length for s in train), default=0),
    }
    return PreparedPrompts(train, val, stats)

