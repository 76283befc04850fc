"""Named prompt templates. A template turns a Conversation into ordered text *segments*.

Each segment says what it is (fixed template text, user text, a reply, or the reply's end
marker) so that ``tokenize.Renderer`` can tokenize the whole string once and label exactly the
reply characters, and so that truncation knows which text may be shortened. The template name is
saved with every adapter (``chinese_vicuna.json``) and reused at inference; ``jinja()`` writes the
same template as a Jinja ``chat_template`` so that transformers, llama.cpp and vLLM render the
very prompt the adapter was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from .formats import Conversation, Message

SegmentKind = Literal["template", "user", "reply", "end"]


@dataclass
class Segment:
    text: str
    kind: SegmentKind
    """``end`` is the reply's terminator (EOS, ``<|im_end|>``...): trained with the reply, never cut."""
    turn: int
    """Index of the user/assistant exchange this text belongs to (-1 = header/system)."""


class TemplateError(ValueError):
    """A template cannot render this conversation."""


def jinja_literal(text: str) -> str:
    """``text`` as a Jinja string literal (JSON escapes are Jinja's and minja's escapes too)."""
    return json.dumps(text, ensure_ascii=False)


def user_text(message: Message) -> str:
    """A user message as one string, for templates without an ``Input`` block of their own."""
    return message.content + (("\n" + message.context) if message.context else "")


class PromptTemplate:
    name: str = ""
    stop_strings: tuple[str, ...] = ()
    default_system: str = ""
    models_own: bool = False
    """The model's own chat template: it writes BOS itself, and its tokenizer is kept as trained."""

    def __init__(self, system_prompt: str | None = None):
        self.system_prompt = system_prompt

    def segments(self, conv: Conversation, add_generation_prompt: bool = False, eos: str = "") -> list[Segment]:
        """Render ``conv`` (``eos``: the tokenizer's EOS text); with ``add_generation_prompt`` it must end on a user message."""
        raise NotImplementedError

    def text(self, conv: Conversation, add_generation_prompt: bool = False, eos: str = "") -> str:
        """The plain string (EOS written as ``eos``): exactly what is tokenized."""
        return "".join(s.text for s in self.segments(conv, add_generation_prompt, eos))

    def jinja(self, bos: bool = False) -> str:
        """This template (with its system prompt) as a Jinja chat template over ``messages``.

        Messages are ``{"role", "content"}`` dicts; a user message may carry Alpaca's ``input``.
        ``apply_chat_template`` renders the same string as :meth:`text` with the tokenizer's EOS,
        preceded by ``bos_token`` when ``bos``: chat engines (transformers, llama-cpp-python, vLLM)
        tokenize a rendered chat without adding BOS, so a model trained with BOS needs it written.
        """
        return ("{{- bos_token -}}\n" if bos else "") + self._jinja()

    def _jinja(self) -> str:
        raise NotImplementedError

    def end_token_ids(self) -> list[int]:
        """Token ids besides the tokenizer's EOS that end a reply in this template (none here)."""
        return []

    def _system(self, conv: Conversation) -> str:
        return conv.system if conv.system is not None else (self.system_prompt or self.default_system)

    def _system_jinja(self, header: str | None = None) -> str:
        """Jinja that writes the system message's text + ``\\n\\n``, else ``header`` (a Jinja expression
        over ``loop_messages``; default: the system prompt or default system text + ``\\n\\n``)."""
        header = header or jinja_literal((self.system_prompt or self.default_system) + "\n\n")
        return (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{{- messages[0]['content'] + '\\n\\n' -}}{%- set loop_messages = messages[1:] -%}"
            f"{{%- else -%}}{{%- set loop_messages = messages -%}}{{{{- {header} -}}}}"
            "{%- endif -%}\n"
        )


def _pairs(conv: Conversation, add_generation_prompt: bool) -> list[tuple[Message, Message | None]]:
    turns = conv.turns
    if any(m.role == "text" for m in turns):
        raise TemplateError(f"{conv.source}: raw text records are not rendered by a prompt template")
    if add_generation_prompt:
        if not turns or turns[-1].role != "user":
            raise TemplateError("a generation prompt needs a conversation ending with a user message")
        turns = turns + [None]  # type: ignore[list-item]
    if len(turns) % 2 or any(m is not None and m.role != r for m, r in zip(turns, ["user", "assistant"] * len(turns))):
        raise TemplateError(f"{conv.source}: expected alternating user/assistant messages")
    return [(turns[i], turns[i + 1]) for i in range(0, len(turns), 2)]  # type: ignore[misc]


_JINJA_INPUT = "message['input'] is defined and message['input']"


class AlpacaTemplate(PromptTemplate):
    """Exactly the Alpaca / Chinese-Vicuna instruct prompt; later turns repeat the blocks.

    As in the chat template, EOS follows only the final reply: a special token inside the text
    would be followed by a ``▁`` in llama.cpp and SentencePiece but not in every HF tokenizer.
    """

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

    def segments(self, conv: Conversation, add_generation_prompt: bool = False, eos: str = "") -> list[Segment]:
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
                segs.append(Segment(reply.content, "reply", k))
                if k == len(pairs) - 1:
                    segs.append(Segment(eos, "end", k))
        return segs

    def _jinja(self) -> str:
        first = "loop_messages and loop_messages[0]['input'] is defined and loop_messages[0]['input']"
        by_input = f"{jinja_literal(self.header_input)} if {first} else {jinja_literal(self.header_plain)}"
        return self._system_jinja(None if self.system_prompt else by_input) + (
            "{%- for message in loop_messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{{- ('\\n\\n' if not loop.first else '') + '### Instruction:\\n' + message['content'] -}}"
            f"{{%- if {_JINJA_INPUT} -%}}{{{{- '\\n\\n### Input:\\n' + message['input'] -}}}}{{%- endif -%}}"
            "{{- '\\n\\n### Response:\\n' -}}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- message['content'] + (eos_token if loop.last else '') -}}"
            "{%- endif -%}{%- endfor -%}"
        )


class VicunaChatTemplate(PromptTemplate):
    """Chinese-Vicuna's chat prompt, exactly as its ``chat_prompt`` builds it.

    A header, then ``User:{q}\\n\\nAssistant:{a}\\n\\n`` per history turn (no EOS inside the
    history), then ``User:{q}\\n\\nAssistant:``; EOS follows only the final reply.
    """

    name = "vicuna-chat"
    stop_strings = ("User:", "\nUser")
    default_system = (
        "The following is a conversation between an AI assistant called Assistant and a human user "
        "called User. The assistant is intelligent, knowledgeable and polite to answer questions of user."
    )

    def segments(self, conv: Conversation, add_generation_prompt: bool = False, eos: str = "") -> list[Segment]:
        segs = [Segment(self._system(conv) + "\n\n", "template", -1)]
        pairs = _pairs(conv, add_generation_prompt)
        for k, (user, reply) in enumerate(pairs):
            segs.append(Segment(("\n\n" if k else "") + "User:", "template", k))
            segs.append(Segment(user_text(user), "user", k))
            segs.append(Segment("\n\nAssistant:", "template", k))
            if reply is not None:
                segs.append(Segment(reply.content, "reply", k))
                if k == len(pairs) - 1:
                    segs.append(Segment(eos, "end", k))
        return segs

    def _jinja(self) -> str:
        return self._system_jinja() + (
            "{%- for message in loop_messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{{- ('\\n\\n' if not loop.first else '') + 'User:' + message['content'] -}}"
            f"{{%- if {_JINJA_INPUT} -%}}{{{{- '\\n' + message['input'] -}}}}{{%- endif -%}}"
            "{{- '\\n\\nAssistant:' -}}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- message['content'] + (eos_token if loop.last else '') -}}"
            "{%- endif -%}{%- endfor -%}"
        )


# Private-use code points: stand-ins for message contents while locating them in a render.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


class ChatTemplate(PromptTemplate):
    """The tokenizer's own Jinja chat template (``template: auto``).

    The conversation is rendered once with a unique stand-in for every message content; the
    stand-ins give each content's exact place, and replacing them gives the real prompt (checked
    against a real render). Cost is linear in the number of turns. A reply's terminator is what
    the template writes after an assistant message up to its last special token (``<|im_end|>``,
    ``<|eot_id|>``, `` </s>``): it is trained with the reply and ends generation.
    """

    name = "auto"
    models_own = True

    def __init__(self, tokenizer, system_prompt: str | None = None):
        super().__init__(system_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'auto' needs a tokenizer with a chat_template; use alpaca or vicuna-chat")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""
        self.terminator = self._find_terminator()
        self.stop_strings = (self.terminator.strip(),) if self.terminator.strip() else ()

    def end_token_ids(self) -> list[int]:
        """The terminator's special token (``<|eot_id|>``...): generation must stop on it."""
        tok = self.tokenizer
        ids = tok(self.terminator.strip(), add_special_tokens=False)["input_ids"] if self.terminator.strip() else []
        return ids[-1:] if ids and ids[-1] != tok.unk_token_id else []

    def _render(self, msgs: list[dict], gen: bool, tools: list[dict] | None = None) -> str:
        try:
            return self.tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # a Jinja TemplateError or a raise_exception() in the template
            raise TemplateError(f"the tokenizer's chat template cannot render this conversation: {e}") from e

    def supports_tools(self) -> bool:
        """Whether the chat template reads ``tools`` (the variable ``apply_chat_template(tools=...)`` sets).

        Read from the template's syntax tree, so a template that only says "tools" in its text does
        not count; a template jinja2 cannot parse alone (transformers' ``{% generation %}`` tag)
        falls back to looking for the word.
        """
        import re

        import jinja2
        from jinja2 import meta

        source = self.tokenizer.chat_template
        if not isinstance(source, str):
            return False
        try:
            env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
            return "tools" in meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError:
            return re.search(r"\btools\b", source) is not None

    def render_tools(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        """The template's own render of messages in transformers' tool-use shapes, with ``tools``.

        Assistant calls are ``{"role": "assistant", "content", "tool_calls": [{"type": "function",
        "id", "function": {"name", "arguments": dict}}]}``, results ``{"role": "tool",
        "tool_call_id", "name", "content"}``. Rendered once with the real contents (no reply spans
        are needed to prompt a model), so the cost is linear in the messages.
        """
        return self._render(messages, add_generation_prompt, tools)

    def _find_terminator(self) -> str:
        probe = "\ue002"
        tail = self._render([{"role": "user", "content": "\ue003"}, {"role": "assistant", "content": probe}], False)
        tail = tail[tail.find(probe) + len(probe):] if probe in tail else ""
        specials = [t for t in self.tokenizer.all_special_tokens if t] + [
            t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if t.special
        ]
        end = max((tail.find(t) + len(t) for t in set(specials) if t in tail), default=0)
        return tail[:end]

    def _messages(self, conv: Conversation, pairs) -> list[tuple[str, str, int]]:
        """(role, content, turn) for each message to render."""
        system = conv.system if conv.system is not None else self.system_prompt
        out = [("system", system, -1)] if system else []
        for k, (user, reply) in enumerate(pairs):
            out.append(("user", user_text(user), k))
            if reply is not None:
                out.append(("assistant", reply.content, k))
        return out

    def segments(self, conv: Conversation, add_generation_prompt: bool = False, eos: str = "") -> list[Segment]:
        msgs = self._messages(conv, _pairs(conv, add_generation_prompt))
        marked = self._render(
            [{"role": r, "content": f"{_MARK_OPEN}{i}{_MARK_CLOSE}"} for i, (r, _, _) in enumerate(msgs)],
            add_generation_prompt,
        )
        segs: list[Segment] = []
        pos, turn = 0, -1
        for i, (role, content, k) in enumerate(msgs):
            mark = f"{_MARK_OPEN}{i}{_MARK_CLOSE}"
            at = marked.find(mark, pos)
            if at < 0:
                raise TemplateError(f"the chat template drops or rewrites a {role} message; use alpaca or vicuna-chat")
            if at > pos:
                segs.append(Segment(marked[pos:at], "template", turn))
            turn = k
            pos = at + len(mark)
            if role == "assistant":
                segs.append(Segment(content, "reply", k))
                if self.terminator and marked.startswith(self.terminator, pos):
                    segs.append(Segment(self.terminator, "end", k))
                    pos += len(self.terminator)
                elif not self.terminator:  # the template ends replies with nothing: EOS makes them stop
                    segs.append(Segment(self.eos, "end", k))
            else:
                segs.append(Segment(content, "user" if role == "user" else "template", k))
        if pos < len(marked):
            segs.append(Segment(marked[pos:], "template", turn))
        real = self._render([{"role": r, "content": c} for r, c, _ in msgs], add_generation_prompt)
        if "".join(s.text for s in segs if not (s.kind == "end" and not self.terminator)) != real:
            raise TemplateError("the chat template rewrites message contents (e.g. strips them); use alpaca or vicuna-chat")
        return segs

    def jinja(self, bos: bool = False) -> str:
        """The tokenizer's own template (it writes BOS itself where it wants one), + the system prompt."""
        if not self.system_prompt:
            return self.tokenizer.chat_template
        # The adapter's system prompt becomes the default system message of the same template.
        return (
            "{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {jinja_literal(self.system_prompt)}}}] + messages -%}}"
            "{%- endif -%}\n" + self.tokenizer.chat_template
        )


def add_eos_ids(generation_config, ids: list[int]) -> None:
    """Add a template's end tokens to a generation config's EOS ids (HF generate, vLLM stop there)."""
    if generation_config is None or not ids:
        return
    have = generation_config.eos_token_id
    have = [have] if isinstance(have, int) else list(have or [])
    generation_config.eos_token_id = have + [i for i in ids if i not in have]


TEMPLATES = {"alpaca": AlpacaTemplate, "vicuna-chat": VicunaChatTemplate}


def get_template(name: str, tokenizer=None, system_prompt: str | None = None) -> PromptTemplate:
    """Look a template up by name (``alpaca``, ``vicuna-chat``, ``auto``)."""
    if name == "auto":
        return ChatTemplate(tokenizer, system_prompt)
    if name not in TEMPLATES:
        raise TemplateError(f"unknown template {name!r}; expected one of {', '.join([*TEMPLATES, 'auto'])}")
    return TEMPLATES[name](system_prompt)
