"""One chat: history, system prompt, decoding settings and a token budget that is never exceeded.

The terminal chat and the web UI both drive a ``ChatSession``; it builds a ``Conversation`` from
the history, measures it with ``engine.prompt_ids`` (the exact ids that will be fed) and trims it
to the budget before every reply:

1. the oldest turns are dropped whole;
2. the oldest turn still kept is shortened from its beginning (user text first, then the reply);
3. only when the current message alone does not fit is its beginning cut (and ``Trim`` says so).

The history itself is never shortened: trimming is redone for every prompt, so raising
``max_memory`` later brings the old turns back.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import tempfile
import threading
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..data.formats import Conversation, Message
from ..data.templates import PromptTemplate, TemplateError, get_template
from ..generation.decode import GenArgs

ELLIPSIS = "…"
"""Marks text whose beginning was cut to fit the budget."""
SAVE_FORMAT = "chinese-vicuna-chat"


class ChatError(ValueError):
    """A chat command cannot be done (bad setting, nothing to undo, prompt cannot fit...)."""


@dataclass
class Trim:
    """What had to go so that the prompt fits the budget."""

    dropped_turns: int = 0
    """Oldest turns left out entirely."""
    shortened_turn: bool = False
    """The oldest turn kept lost the beginning of its text."""
    cut_chars: int = 0
    """Characters cut from the beginning of the current message (0: it is intact)."""

    @property
    def notice(self) -> str | None:
        """A sentence for the user when their own message was cut (history trimming is routine)."""
        if not self.cut_chars:
            return None
        return (
            f"your message is longer than the memory budget: its first {self.cut_chars} characters "
            "were left out of the prompt"
        )


def _mark(text: str, cut: int) -> str:
    """``text`` without its first ``cut`` characters, marked with an ellipsis when anything was cut."""
    rest = text[cut:]
    return ELLIPSIS + rest if cut and rest else rest


def _smallest(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """Smallest ``n`` in [lo, hi] with ``fits(n)``, assuming fits is (nearly) monotone; None if none.

    Token counts of a text suffix are only nearly monotone in the cut (merges differ at the cut),
    so the answer is re-checked and, if needed, moved forward until it really fits.
    """
    if not fits(hi):
        return None
    a, b = lo, hi
    while a < b:
        mid = (a + b) // 2
        if fits(mid):
            b = mid
        else:
            a = mid + 1
    while not fits(a):  # a non-monotone spot: walk forward to a verified fit (hi fits)
        a += 1
    return a


class ReplyStream:
    """A reply being generated: iterate for text deltas; the turn is recorded when it ends.

    Wraps the engine's ``TextStream`` (``text``, ``best_text``, ``finish_reason``,
    ``prompt_tokens``, ``completion_tokens`` are read through). A reply that is cancelled or
    abandoned (Ctrl-C, a closed generator) is recorded with its partial text; one that fails
    with an exception is not recorded.
    """

    def __init__(self, inner, on_done: Callable[[ReplyStream], None], trim: Trim):
        self._inner = inner
        self._on_done = on_done
        self.trim = trim
        self.finished = False
        self._reason: str | None = None

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    @property
    def finish_reason(self) -> str | None:
        return self._reason or self._inner.finish_reason

    def __iter__(self) -> Iterator[str]:
        failed = False
        try:
            yield from self._inner
        except Exception:
            failed = True
            raise
        finally:
            # GeneratorExit / KeyboardInterrupt are not Exceptions: the partial reply is kept.
            if not self.finished:
                self.finished = True
                if self._inner.finish_reason is None:
                    self._reason = "cancelled"
                if not failed:
                    self._on_done(self)

    def run(self) -> str:
        """Consume the stream; return the full text."""
        for _ in self:
            pass
        return self.text


def _parse(name: str, kind, value):
    """Check (and, for strings, convert) a value for a field typed ``kind``."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        kind = next(a for a in args if a is not type(None))
    if isinstance(value, str):
        text = value.strip().lower()
        if kind is bool and text in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return text in ("true", "1", "yes", "on")
        try:
            if kind is not bool:
                return kind(text)
        except ValueError:
            pass
        raise ChatError(f"{name}: expected {kind.__name__}, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ChatError(f"{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


# Ranges that GenArgs' consumers rely on; checked here so a typo is an error, not a crash mid-reply.
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "min_new_tokens": (lambda v: v >= 0, ">= 0"),
    "temperature": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "0 < top_p <= 1"),
    "top_k": (lambda v: v >= 0, ">= 0"),
    "num_beams": (lambda v: v >= 1, ">= 1"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "no_repeat_ngram_size": (lambda v: v >= 0, ">= 0"),
    "max_memory": (lambda v: v >= 1, ">= 1"),
}


class ChatSession:
    """A multi-turn chat on an ``Engine``.

    Args:
        engine: the loaded model (``chinese_vicuna.generation.engine.Engine``).
        system: system prompt / global instruction; None uses the template's default.
        max_memory: token budget for the rendered prompt; the model context minus
            ``max_new_tokens`` always applies too.
        gen: decoding settings (copied).
        adapter: adapter name, or "base"; default: the engine's first adapter.
        template: template name (alpaca, vicuna-chat, auto); default: the engine's.
    """

    def __init__(self, engine, system: str | None = None, max_memory: int | None = None, gen: GenArgs | None = None,
                 *, adapter: str | None = None, template: str | None = None):
        self.engine = engine
        self.system: str | None = None
        self.set_system(system)
        self.max_memory = max_memory
        self.gen = dataclasses.replace(gen) if gen is not None else GenArgs()
        self.adapter = adapter if adapter is not None else (engine.adapters[0] if engine.adapters else "base")
        self.template: PromptTemplate = engine.template
        if template:
            self.set_template(template)
        self.history: list[tuple[str, str]] = []
        self.last_trim = Trim()
        self._cancel = threading.Event()
        self._active: ReplyStream | None = None

    def __deepcopy__(self, memo) -> ChatSession:
        """A copy with its own history and settings that shares the loaded engine (the model is
        never copied; Gradio deep-copies each browser tab's initial state)."""
        other = ChatSession(self.engine, self.system, self.max_memory, self.gen, adapter=self.adapter)
        other.template, other.history = self.template, list(self.history)
        return other

    # -- settings ---------------------------------------------------------------------------
    def set_system(self, text: str | None) -> None:
        """Set the system prompt; empty or None falls back to the template's default."""
        self.system = text if text and text.strip() else None

    @property
    def effective_system(self) -> str:
        """The system text the template renders ("" where it renders none of its own)."""
        if self.system is not None:
            return self.system
        return self.template.system_prompt or self.template.default_system

    def set_template(self, name: str) -> None:
        """Render with another template (keeps the system prompt recorded with the adapter)."""
        try:
            self.template = get_template(name, self.engine.tokenizer, self.engine.template.system_prompt)
        except TemplateError as e:
            raise ChatError(str(e)) from None

    def set_adapter(self, name: str | None) -> None:
        """Answer with another loaded adapter; "base" (or None) is the bare base model."""
        name = name or "base"
        if name not in (*self.engine.adapters, "base", self.engine.name):
            raise ChatError(f"unknown adapter {name!r}; loaded: {', '.join([*self.engine.adapters, 'base'])}")
        self.adapter = name

    def set(self, param: str, value) -> object:
        """Set a decoding field (any ``GenArgs`` field, or ``max_memory``) with type and range checks.

        Strings are converted (``"0.7"``, ``"true"``, ``"none"``), so the terminal ``/set`` and the
        web UI share this. Returns the value stored.
        """
        name = param.strip().replace("-", "_")
        fields = {**typing.get_type_hints(GenArgs), "max_memory": int | None}
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ChatError(f"unknown setting {param!r}{hint}; settable: {', '.join(fields)}")
        parsed = _parse(name, fields[name], value)
        check, expected = _RANGES.get(name, (None, ""))
        if parsed is not None and check is not None and not check(parsed):
            raise ChatError(f"{name}: expected {expected}, got {parsed}")
        if name == "max_memory":
            self.max_memory = parsed
        else:
            self.gen = dataclasses.replace(self.gen, **{name: parsed})
        return parsed

    def settings(self) -> dict[str, object]:
        """Every settable value, for display."""
        return {**dataclasses.asdict(self.gen), "max_memory": self.max_memory}

    # -- the prompt -------------------------------------------------------------------------
    def budget(self) -> int:
        """Most prompt tokens allowed: min(max_memory, model context - max_new_tokens)."""
        room = self.engine.context_length - self.gen.max_new_tokens
        limit = min(room, self.max_memory) if self.max_memory else room
        if limit < 1:
            raise ChatError(
                f"no room for a prompt: the model context is {self.engine.context_length} tokens and "
                f"max_new_tokens is {self.gen.max_new_tokens}; lower max_new_tokens"
            )
        return limit

    def conversation(self, turns: list[tuple[str, str]], message: str) -> Conversation:
        msgs = [Message("system", self.system)] if self.system is not None else []
        for user, reply in turns:
            msgs += [Message("user", user), Message("assistant", reply)]
        return Conversation(msgs + [Message("user", message)])

    def _ids(self, turns: list[tuple[str, str]], message: str) -> list[int]:
        return self.engine.prompt_ids(self.conversation(turns, message), self.template)

    def prompt(self, message: str) -> tuple[list[int], Trim]:
        """The ids to feed for ``message`` after the history, trimmed to ``budget()``."""
        limit = self.budget()
        turns = list(self.history)

        def fits(t: list[tuple[str, str]], m: str) -> bool:
            return len(self._ids(t, m)) <= limit

        if fits(turns, message):
            return self._ids(turns, message), Trim()
        # The prompt is tokenized as one string: its length falls (nearly) monotonically as turns go;
        # _smallest re-checks the answer it finds.
        drop = _smallest(1, len(turns), lambda k: fits(turns[k:], message))
        if drop is not None:
            old_user, old_reply = turns[drop - 1]
            total = len(old_user) + len(old_reply)

            def shortened(c: int) -> tuple[str, str]:
                if c <= len(old_user):
                    return _mark(old_user, c), old_reply
                return "", _mark(old_reply, c - len(old_user))

            cut = _smallest(1, total, lambda c: fits([shortened(c), *turns[drop:]], message))
            if cut is not None and cut < total:
                kept = [shortened(cut), *turns[drop:]]
                return self._ids(kept, message), Trim(dropped_turns=drop - 1, shortened_turn=True)
            return self._ids(turns[drop:], message), Trim(dropped_turns=drop)
        cut = _smallest(1, len(message), lambda c: fits([], _mark(message, c)))
        if cut is None:
            floor = len(self._ids([], ""))
            raise ChatError(
                f"the system prompt and template alone take {floor} tokens; the budget is {limit} "
                "(max_memory, or the model context minus max_new_tokens)"
            )
        return self._ids([], _mark(message, cut)), Trim(dropped_turns=len(turns), cut_chars=cut)

    def prompt_text(self, message: str) -> str:
        """The prompt for ``message`` as text, special tokens shown (for tests and debugging)."""
        ids, _ = self.prompt(message)
        return self.engine.tokenizer.decode(ids, skip_special_tokens=False)

    # -- replies ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A reply is being generated."""
        return self._active is not None and not self._active.finished

    def stop(self) -> None:
        """Ask the running reply to end after its current token (thread-safe)."""
        self._cancel.set()

    def _check_idle(self) -> None:
        if self.busy:
            raise ChatError("a reply is being generated; stop it first")

    def send(self, text: str, cancel: Callable[[], bool] | None = None) -> ReplyStream:
        """Stream the reply to ``text``; the turn joins the history when the stream ends.

        Args:
            text: the user's message.
            cancel: polled between tokens; True ends the reply (``stop()`` does the same).
        """
        self._check_idle()
        if not text.strip():
            raise ChatError("empty message")
        ids, trim = self.prompt(text)
        self.last_trim = trim
        self._cancel.clear()
        flag = self._cancel

        def cancelled() -> bool:
            return flag.is_set() or (cancel is not None and bool(cancel()))

        inner = self.engine.stream(ids, self.gen, adapter=self.adapter, template=self.template, cancel=cancelled)

        def record(stream: ReplyStream) -> None:
            self.history.append((text, stream.text.strip()))

        self._active = ReplyStream(inner, record, trim)
        return self._active

    def regenerate(self, cancel: Callable[[], bool] | None = None) -> ReplyStream:
        """Answer the last message again (its old reply is dropped now)."""
        self._check_idle()
        if not self.history:
            raise ChatError("nothing to regenerate: the history is empty")
        user, _ = self.history.pop()
        return self.send(user, cancel)

    def undo(self) -> tuple[str, str] | None:
        """Remove and return the last turn (None when the history is empty)."""
        self._check_idle()
        return self.history.pop() if self.history else None

    def clear(self) -> None:
        """Forget every turn (settings and system prompt stay)."""
        self._check_idle()
        self.history.clear()

    # -- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": SAVE_FORMAT,
            "version": 1,
            "system": self.system,
            "template": self.template.name,
            "adapter": self.adapter,
            "max_memory": self.max_memory,
            "gen": dataclasses.asdict(self.gen),
            "history": [{"user": u, "assistant": a} for u, a in self.history],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the chat as JSON, atomically (a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Replace history and settings with a saved chat (validated before anything changes)."""
        self._check_idle()
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ChatError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
            raise ChatError(f"{path}: not a saved chat (expected \"format\": \"{SAVE_FORMAT}\")")
        history = []
        for i, turn in enumerate(data.get("history") or []):
            if not (isinstance(turn, dict) and isinstance(turn.get("user"), str) and isinstance(turn.get("assistant"), str)):
                raise ChatError(f"{path}: history[{i}]: expected {{\"user\": str, \"assistant\": str}}")
            history.append((turn["user"], turn["assistant"]))
        trial = copy.deepcopy(self)  # settings are validated on a scratch copy first
        for key, value in (data.get("gen") or {}).items():
            trial.set(key, value)
        trial.set("max_memory", data.get("max_memory"))
        if data.get("template") and data["template"] != self.template.name:
            trial.set_template(data["template"])
        if data.get("adapter") in (*self.engine.adapters, "base"):  # else: not loaded here, keep ours
            trial.adapter = data["adapter"]
        trial.set_system(data.get("system"))
        self.gen, self.max_memory, self.template, self.adapter = trial.gen, trial.max_memory, trial.template, trial.adapter
        self.system, self.history = trial.system, history
