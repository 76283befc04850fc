"""Preference records -> (prompt, chosen, rejected) pairs or KTO's unpaired (prompt, completion, label).

Formats, detected per record from its keys:

- TRL: ``{"prompt", "chosen", "rejected"}``; each a string, or a message list (``role``/``content``).
  Without ``prompt``, ``chosen``/``rejected`` are whole conversations sharing their prompt
  (TRL's "implicit prompt" form).
- alpaca-style: ``{"instruction", "input", "chosen", "rejected"}`` (+ optional ``system``, ``history``).
- ShareGPT preference: ``{"conversations": [...ending with the user], "chosen": {"from": "gpt",
  "value"}, "rejected": {...}}`` (+ optional ``system``).
- HH-RLHF: ``{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": …}``.
- KTO unpaired: ``{"prompt", "completion", "label": true|false}``.

Chosen and rejected are rendered by the same template and whole-string tokenization as SFT
(``Renderer.render``); only the final reply's tokens are trained. Every problem is reported as
``file:line: field: what was expected``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..stages import get_stage
from .datasets import DataError, Source, read_sources, report_rejects, split
from .formats import (
    Conversation,
    Message,
    RecordError,
    alpaca_messages,
    nonempty,
    role_messages,
    string_field,
)
from .tokenize import Renderer, Sample

PREF_FORMATS = ("trl", "alpaca", "sharegpt", "hh-rlhf", "kto")


@dataclass
class Preference:
    """One prompt (a conversation ending with the user) and two replies, chosen better than rejected."""

    prompt: list[Message]
    chosen: str
    rejected: str
    source: str = ""


@dataclass
class Unpaired:
    """KTO's record: one reply to a prompt, labelled desirable or not."""

    prompt: list[Message]
    completion: str
    desirable: bool
    source: str = ""


@dataclass
class PairSample:
    chosen: Sample
    rejected: Sample
    source: str = ""

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


@dataclass
class KTOSample:
    sample: Sample
    desirable: bool
    kl: Sample | None = None
    """The prompt with another record's completion: KTO's estimate of KL(policy || reference)."""
    source: str = ""

    @property
    def length(self) -> int:
        return len(self.sample.input_ids)


@dataclass
class PreparedPreferences:
    train: list
    val: list
    stats: dict[str, Any] = field(default_factory=dict)


_OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect_preference_format(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise RecordError(where, "record", f"expected a JSON object, got {type(record).__name__}")
    if "label" in record or "completion" in record:
        return "kto"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record:
        return "trl"
    if isinstance(record.get("chosen"), str) and "\n\nAssistant:" in record["chosen"]:
        return "hh-rlhf"
    if isinstance(record.get("chosen"), list):
        return "trl"
    raise RecordError(
        where,
        "record",
        "expected a preference record: prompt/chosen/rejected (TRL), instruction/input/chosen/rejected "
        "(alpaca), conversations + chosen/rejected (sharegpt), chosen/rejected HH-RLHF text with "
        f"'\\n\\nHuman:'/'\\n\\nAssistant:' turns, or prompt/completion/label (KTO); got keys {sorted(record)}",
    )


def prompt_messages(value: Any, where: str, key: str) -> list[Message]:
    """A prompt: a string (the user's message) or a message list ending with the user."""
    if isinstance(value, str):
        return [Message("user", nonempty(value, where, key))]
    if not isinstance(value, list) or not value:
        raise RecordError(where, key, "expected a string or a non-empty list of messages")
    msgs = _messages(value, where, key)
    turns = [m for m in msgs if m.role != "system"]
    if not turns or turns[-1].role != "user":
        raise RecordError(where, key, "expected the prompt to end with a user message")
    alternating_messages(turns, where, key)
    return msgs


def _messages(items: list, where: str, key: str) -> list[Message]:
    msgs = []
    for i, m in enumerate(items):
        f = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(where, f, "expected an object with role and content")
        role = m.get("role")
        if role not in _OPENAI_ROLES:
            raise RecordError(where, f"{f}.role", f"expected one of {sorted(_OPENAI_ROLES)}, got {role!r}")
        text = m.get("content")
        if not isinstance(text, str):
            raise RecordError(where, f"{f}.content", f"expected a string, got {type(text).__name__}")
        if role == "system" and i != 0:
            raise RecordError(where, f"{f}.role", "a system message is only allowed first")
        msgs.append(Message(role, text))
    return msgs


def alternating_messages(turns: list[Message], where: str, key: str) -> None:
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise RecordError(where, key, f"expected alternating user/assistant turns starting with user; turn {i} is {m.role}")


def _reply(value: Any, where: str, key: str) -> str:
    """A reply: a string, or a message list whose last message is the assistant's reply."""
    if isinstance(value, str):
        return nonempty(value, where, key)
    if isinstance(value, list) and value:
        msgs = _messages(value, where, key)
        if msgs[-1].role != "assistant":
            raise RecordError(where, key, "expected the reply to end with an assistant message")
        if len(msgs) > 1:
            raise RecordError(where, key, "expected one assistant message when a prompt is given")
        return nonempty(msgs[-1].content, where, f"{key}[0].content")
    raise RecordError(where, key, "expected a string or a list with one assistant message")


def _implicit(record: dict, where: str) -> Preference:
    """TRL's implicit-prompt form: two whole conversations that differ only in the last reply."""
    convs = {}
    for key in ("chosen", "rejected"):
        v = record.get(key)
        if not isinstance(v, list) or not v:
            raise RecordError(where, key, "expected a non-empty list of messages (or give a prompt)")
        msgs = _messages(v, where, key)
        turns = [m for m in msgs if m.role != "system"]
        alternating_messages(turns, where, key)
        if turns[-1].role != "assistant":
            raise RecordError(where, key, "expected the conversation to end with an assistant reply")
        convs[key] = msgs
    c, r = convs["chosen"], convs["rejected"]
    if [(m.role, m.content) for m in c[:-1]] != [(m.role, m.content) for m in r[:-1]]:
        raise RecordError(where, "chosen/rejected", "expected the same prompt (all messages before the last reply)")
    return Preference(c[:-1], nonempty(c[-1].content, where, "chosen"), nonempty(r[-1].content, where, "rejected"), where)


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_turns(text: str, where: str, key: str) -> list[Message]:
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RecordError(where, key, "expected the text to start with '\\n\\nHuman: '")
    msgs = []
    for speaker, body in zip(parts[1::2], parts[2::2]):
        msgs.append(Message("user" if speaker == "Human" else "assistant", body))
    if not msgs:
        raise RecordError(where, key, "expected '\\n\\nHuman: …\\n\\nAssistant: …' turns")
    if msgs[-1].role != "assistant":
        raise RecordError(where, key, "expected the text to end with an '\\n\\nAssistant: ' reply")
    alternating_messages(msgs, where, key)
    return msgs


def _hh(record: dict, where: str) -> Preference:
    c = _hh_turns(string_field(record, "chosen", where), where, "chosen")
    r = _hh_turns(string_field(record, "rejected", where), where, "rejected")
    if [(m.role, m.content) for m in c[:-1]] != [(m.role, m.content) for m in r[:-1]]:
        raise RecordError(where, "chosen/rejected", "expected the same dialogue before the last '\\n\\nAssistant: '")
    return Preference(c[:-1], nonempty(c[-1].content, where, "chosen"), nonempty(r[-1].content, where, "rejected"), where)


def to_preference(record: Any, where: str, fmt: str = "auto") -> Preference | Unpaired:
    """Convert one parsed record; raises RecordError naming the field and what was expected."""
    if fmt == "auto":
        fmt = detect_preference_format(record, where)
    if not isinstance(record, dict):
        raise RecordError(where, "record", f"expected a JSON object, got {type(record).__name__}")
    if fmt == "kto":
        label = record.get("label")
        if not isinstance(label, bool):
            raise RecordError(where, "label", f"expected true or false, got {label!r}")
        prompt = prompt_messages(record.get("prompt"), where, "prompt")
        return Unpaired(prompt, _reply(record.get("completion"), where, "completion"), label, where)
    if fmt == "alpaca":
        r = dict(record)
        r["output"] = "-"  # alpaca_messages's reply slot; the replies are chosen/rejected
        prompt = alpaca_messages(r, where)[:-1]
        return Preference(prompt, _reply(record.get("chosen"), where, "chosen"), _reply(record.get("rejected"), where, "rejected"), where)
    if fmt == "sharegpt":
        msgs = []
        if isinstance(record.get("system"), str) and record["system"].strip():
            msgs.append(Message("system", record["system"]))
        conv = record.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise RecordError(where, "conversations", "expected a non-empty list of messages")
        # role_messages wants a conversation ending with the assistant: validate with a stand-in reply.
        full = role_messages(conv + [{"from": "gpt", "value": "-"}], where, "conversations", "from", "value", SHAREGPT_ROLES)
        msgs += full[:-1]
        replies = []
        for key in ("chosen", "rejected"):
            v = record.get(key)
            if isinstance(v, dict):
                if v.get("from") not in ("gpt", "assistant"):
                    raise RecordError(where, f"{key}.from", f"expected 'gpt', got {v.get('from')!r}")
                text = v.get("value")
                if not isinstance(text, str):
                    raise RecordError(where, f"{key}.value", f"expected a string, got {type(text).__name__}")
                replies.append(nonempty(text, where, f"{key}.value"))
            elif isinstance(v, str):
                replies.append(nonempty(v, where, key))
            else:
                raise RecordError(where, key, 'expected {"from": "gpt", "value": "..."}')
        return Preference(msgs, replies[0], replies[1], where)
    if fmt == "hh-rlhf":
        return _hh(record, where)
    if fmt == "trl":
        if "prompt" not in record:
            return _implicit(record, where)
        prompt = prompt_messages(record.get("prompt"), where, "prompt")
        return Preference(prompt, _reply(record.get("chosen"), where, "chosen"), _reply(record.get("rejected"), where, "rejected"), where)
    raise RecordError(where, "format", f"expected one of {', '.join(PREF_FORMATS)}, got {fmt!r}")


def _key(prompt: list[Message], *replies: str) -> tuple:
    return tuple((m.role, " ".join(m.content.split()), " ".join(m.context.split())) for m in prompt) + tuple(
        " ".join(r.split()) for r in replies
    )


@dataclass
class LoadedPreferences:
    records: list
    rejects: list[dict] = field(default_factory=list)
    duplicates: int = 0


def _item_key(r) -> tuple:
    if isinstance(r, Preference):
        return _key(r.prompt, r.chosen, r.rejected)
    return _key(r.prompt, r.completion, str(r.desirable))


def load_preferences(
    sources: list[Source], stage: str, on_bad_record: str = "error", dedup: bool = True, seed: int = 42
) -> LoadedPreferences:
    """Read every source, convert records, drop duplicates, apply weights (seeded).

    ``stage`` ``kto`` takes unpaired records, and paired ones split into a desirable and an
    undesirable record (as TRL's ``unpair_preference_dataset``); the paired stages need pairs.
    """
    fmt_names = {"auto": "auto", "alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "trl"}

    labelled = get_stage(stage).records == "labelled"

    def convert(record, where, src):
        rec = to_preference(record, where, fmt_names.get(src.format, src.format))
        if isinstance(rec, Unpaired) and not labelled:
            raise RecordError(
                where, "record", f"expected a chosen/rejected pair for stage {stage}; prompt/completion/label records are for stage kto"
            )
        if isinstance(rec, Preference) and labelled:
            return [Unpaired(rec.prompt, rec.chosen, True, where), Unpaired(rec.prompt, rec.rejected, False, where)]
        return [rec]

    return LoadedPreferences(*read_sources(sources, convert, _item_key, on_bad_record, dedup, seed))


def render_reply(renderer: Renderer, prompt: list[Message], reply: str, source: str = "") -> Sample | None:
    """``prompt`` + the assistant's ``reply`` tokenized as SFT does; only the reply (and its end) trained."""
    return renderer.render(Conversation(list(prompt) + [Message("assistant", reply)], source=source))


def prepare_preferences(
    renderer: Renderer,
    sources: list[Source],
    stage: str,
    *,
    val_size: float = 0.0,
    seed: int = 42,
    dedup: bool = True,
    on_bad_record: str = "error",
    max_samples: int | None = None,
    rejects_path: str | None = None,
    progress: bool = True,
) -> PreparedPreferences:
    """From data sources to tokenized pairs (or KTO samples), split into train/validation, with statistics.

    ``renderer`` must train only the final reply (``mask="last"``).
    """
    loaded = load_preferences(sources, stage, on_bad_record, dedup, seed)
    labelled = get_stage(stage).records == "labelled"
    report_rejects(loaded.rejects, rejects_path)
    samples: list = []
    kto_pairs: list[tuple[KTOSample, Unpaired]] = []
    dropped = truncated = 0
    for rec in tqdm(loaded.records, desc="tokenizing pairs", disable=not progress, leave=False):
        if isinstance(rec, Preference):
            c = render_reply(renderer, rec.prompt, rec.chosen, rec.source)
            r = render_reply(renderer, rec.prompt, rec.rejected, rec.source)
            if c is None or r is None or not c.trained or not r.trained:
                dropped += 1
                continue
            truncated += c.truncated or r.truncated
            samples.append(PairSample(c, r, rec.source))
        else:
            s = render_reply(renderer, rec.prompt, rec.completion, rec.source)
            if s is None or not s.trained:
                dropped += 1
                continue
            truncated += s.truncated
            samples.append(KTOSample(s, rec.desirable, None, rec.source))
            kto_pairs.append((samples[-1], rec))
    if not samples:
        raise DataError("no trainable preference samples left after tokenization (all dropped or empty)")
    if labelled:
        if len(samples) < 2:
            raise DataError("stage kto needs at least 2 records (its KL estimate pairs each prompt with another completion)")
        _attach_kl(renderer, kto_pairs, seed)
    train, val = split(samples, val_size, seed)
    if max_samples:
        train = train[:max_samples]
    stats: dict[str, Any] = {
        "records": len(loaded.records),
        "duplicates_removed": loaded.duplicates,
        "rejected": len(loaded.rejects),
        "truncated": truncated,
        "dropped": dropped,
    }
    if labelled:
        stats["train_desirable"] = sum(s.desirable for s in train)
        stats["train_undesirable"] = sum(not s.desirable for s in train)
    else:
        stats["train_pairs"] = len(train)
    stats["val_samples"] = len(val)
    stats["max_len"] = max((s.length for s in train), default=0)
    stats["trained_tokens"] = sum(_trained(s) for s in train)
    return PreparedPreferences(train, val, stats)


def _trained(s) -> int:
    if isinstance(s, PairSample):
        return s.chosen.trained + s.rejected.trained
    return s.sample.trained


def _attach_kl(renderer: Renderer, pairs: list[tuple[KTOSample, Unpaired]], seed: int) -> None:
    """Give each KTO sample a mismatched (prompt, completion): its prompt with another record's reply.

    TRL builds the same estimate by shifting completions by one within a batch; here the pairing
    is fixed per dataset (a seeded cycle), so the reference side is computed once and a resumed or
    multi-process run sees the same pairs.
    """
    order = list(range(len(pairs)))
    random.Random(seed + 7).shuffle(order)
    for k, i in enumerate(order):
        sample, rec = pairs[i]
        other = pairs[order[(k + 1) % len(order)]][1]
        kl = render_reply(renderer, rec.prompt, other.completion, rec.source)
        sample.kl = kl if kl is not None else sample.sample
