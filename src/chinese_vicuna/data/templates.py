"""Named prompt templates. A template turns a Conversation into ordered text *segments*.

Each segment says what it is (fixed template text, user text, or a reply) so that
``tokenize.render`` can build ``input_ids`` and ``labels`` from the very same pieces, and so
that truncation knows which text may be shortened. The template name is saved with every
adapter (``chinese_vicuna.json``) and reused at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .formats import Conversation, Message

SegmentKind = Literal["template", "user", "reply"]


@dataclass
class Segment:
    text: str
    kind: SegmentKind
    turn: int
    """Index of the user/assistant exchange this text belongs to (-1 = header/system)."""
    eos: bool = False
    """Append the tokenizer's EOS id after this text (replies of templates with no end marker)."""


class TemplateError(ValueError):
    """A template cannot render this conversation."""


class PromptTemplate:
    name: str = ""
    stop_strings: tuple[str, ...] = ()
    default_system: str = ""

    def __init__(self, system_prompt: str | None = None):
        self.system_prompt = system_prompt

    def segments(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Segment]:
        """Render ``conv``; with ``add_generation_prompt`` it must end on a user message."""
        raise NotImplementedError

    def text(self, conv: Conversation, add_generation_prompt: bool = False, eos: str = "") -> str:
        """The plain string (EOS shown as ``eos``); handy for tests and ``data inspect``."""
        return "".join(s.text + (eos if s.eos else "") for s in self.segments(conv, add_generation_prompt))

    def _system(self, conv: Conversation) -> str:
        return conv.system if conv.system is not None else (self.system_prompt or self.default_system)


def _pairs(conv: Conversation, add_generation_prompt: bool) -> list[tuple[Message, Message | None]]:
    turns = conv.turns
    if any(m.role == "text" for m in turns):
        raise TemplateError(f"{conv.source}: raw text records are not rendered by a prompt template")
    if add_generation_prompt:
        if not turns or turns[-1].role != "user":
            raise TemplateError("a generation prompt needs a conversation ending with a user message")
        turns = turns + [None]  # type: ignore[list-item]
    if len(turns) % 2:
        raise TemplateError(f"{conv.source}: expected user/assistant pairs")
    return [(turns[i], turns[i + 1]) for i in range(0, len(turns), 2)]  # type: ignore[misc]


class AlpacaTemplate(PromptTemplate):
    """Exactly the Alpaca / Chinese-Vicuna instruct prompt; later turns repeat the blocks."""

    name = "alpaca"
    stop_strings = ("### Instruction:", "### Response:", "### Input:")
    header_input = (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
    )
    header_plain = (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n"
    )

    def segments(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Segment]:
        pairs = _pairs(conv, add_generation_prompt)
        if conv.system is not None or self.system_prompt:
            header = self._system(conv) + "\n\n"
        else:
            header = self.header_input if pairs and pairs[0][0].context else self.header_plain
        segs = [Segment(header, "template", -1)]
        for k, (user, reply) in enumerate(pairs):
            segs.append(Segment(("\n\n" if k else "") + "### Instruction:\n", "template", k))
            segs.append(Segment(user.content, "user", k))
            if user.context:
                segs.append(Segment("\n\n### Input:\n", "template", k))
                segs.append(Segment(user.context, "user", k))
            segs.append(Segment("\n\n### Response:\n", "template", k))
            if reply is not None:
                segs.append(Segment(reply.content, "reply", k, eos=True))
        return segs


class VicunaChatTemplate(PromptTemplate):
    """Chinese-Vicuna's chat prompt: a header, then ``User:{q}\\n\\nAssistant:{a}\\n\\n`` per turn."""

    name = "vicuna-chat"
    stop_strings = ("User:", "\nUser")
    default_system = (
        "The following is a conversation between an AI assistant called Assistant and a human user "
        "called User. The assistant is intelligent, knowledgeable and polite to answer questions of user."
    )

    def segments(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Segment]:
        segs = [Segment(self._system(conv) + "\n\n", "template", -1)]
        for k, (user, reply) in enumerate(_pairs(conv, add_generation_prompt)):
            segs.append(Segment(("\n\n" if k else "") + "User:", "template", k))
            segs.append(Segment(user.content + (("\n" + user.context) if user.context else ""), "user", k))
            segs.append(Segment("\n\nAssistant:", "template", k))
            if reply is not None:
                segs.append(Segment(reply.content, "reply", k, eos=True))
        return segs


class ChatTemplate(PromptTemplate):
    """The tokenizer's own Jinja chat template (``template: auto``).

    Segments come from rendering growing prefixes of the conversation and taking the string
    differences, so the trained span is known exactly without re-tokenizing and guessing lengths.
    """

    name = "auto"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        super().__init__(system_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'auto' needs a tokenizer with a chat_template; use alpaca or vicuna-chat")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""

    def _render(self, msgs: list[dict], gen: bool) -> str:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _prompt_segments(self, chunk: str, users: list[Message], turn: int) -> list[Segment]:
        out, pos = [], 0
        for u in users:
            text = u.content + (("\n" + u.context) if u.context else "")
            i = chunk.find(text, pos) if text else -1
            if i < 0:
                continue
            if i > pos:
                out.append(Segment(chunk[pos:i], "template", turn))
            out.append(Segment(text, "user", turn))
            pos = i + len(text)
        if pos < len(chunk):
            out.append(Segment(chunk[pos:], "template", turn))
        return out

    def segments(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Segment]:
        pairs = _pairs(conv, add_generation_prompt)
        msgs: list[dict] = []
        system = conv.system if conv.system is not None else self.system_prompt
        if system:
            msgs.append({"role": "system", "content": system})
        segs: list[Segment] = []
        prev = ""
        for k, (user, reply) in enumerate(pairs):
            msgs.append({"role": "user", "content": user.content + (("\n" + user.context) if user.context else "")})
            prompt = self._render(msgs, gen=True)
            if not prompt.startswith(prev):
                raise TemplateError("the chat template is not prefix-stable; use alpaca or vicuna-chat")
            segs += self._prompt_segments(prompt[len(prev):], [user], k)
            if reply is None:
                break
            msgs.append({"role": "assistant", "content": reply.content})
            full = self._render(msgs, gen=False)
            if not full.startswith(prompt):
                raise TemplateError("the chat template is not prefix-stable; use alpaca or vicuna-chat")
            tail = full[len(prompt):]
            end = tail.find(reply.content)
            end = len(tail) if end < 0 else end + len(reply.content)
            has_eos = bool(self.eos) and tail.startswith(self.eos, end)
            if has_eos:
                end += len(self.eos)
            segs.append(Segment(tail[:end], "reply", k, eos=not has_eos))
            if tail[end:]:
                segs.append(Segment(tail[end:], "template", k))
            prev = full
        return segs


TEMPLATES = {"alpaca": AlpacaTemplate, "vicuna-chat": VicunaChatTemplate}


def get_template(name: str, tokenizer=None, system_prompt: str | None = None) -> PromptTemplate:
    """Look a template up by name (``alpaca``, ``vicuna-chat``, ``auto``)."""
    if name == "auto":
        return ChatTemplate(tokenizer, system_prompt)
    if name not in TEMPLATES:
        raise TemplateError(f"unknown template {name!r}; expected one of {', '.join([*TEMPLATES, 'auto'])}")
    return TEMPLATES[name](system_prompt)
