"""Terminal chat: streaming replies, slash commands, multi-line input, Ctrl-C that stops a reply.

Input: a line ending with ``\\`` continues on the next line; a line starting with ``\"\"\"`` opens
a block that ends at the next line ending with ``\"\"\"``. Ctrl-C while a reply streams stops the
reply (the partial text is kept in the history); Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from .session import ChatError, ChatSession, ReplyStream

PROMPT = "User> "
CONTINUE = "...   "
ASSISTANT = "Assistant> "
BLOCK = '"""'

HELP = """\
commands:
  /help                 this text
  /clear                forget the history
  /undo                 remove the last turn
  /regen                answer the last message again
  /system [TEXT]        show, or set, the system prompt (/system - : back to the template's default)
  /set [NAME VALUE]     show settings, or set one: /set temperature 0.7, /set do_sample true,
                        /set max_memory 512 (any decoding setting)
  /adapter [NAME]       show, or switch, the adapter (base: the bare base model)
  /history              show the turns kept so far
  /save FILE.json       save the chat (history + settings)
  /load FILE.json       load a saved chat
  /exit                 leave (Ctrl-D or Ctrl-C at the prompt too)
input:
  end a line with \\ to continue it; wrap several lines in \"\"\" ... \"\"\"; Ctrl-C stops a reply;
  start a message with // to send a text that begins with /"""


class _Quit(Exception):
    """Leave the chat loop."""


def read_message(read: Callable[[str], str]) -> str | None:
    """One message from ``read`` (``input``-like), joining continued lines and \"\"\" blocks.

    Returns None when a continued message is abandoned with Ctrl-C. EOFError and
    KeyboardInterrupt at the first prompt propagate (the caller leaves).
    """
    line = read(PROMPT)
    try:
        stripped = line.strip()
        if stripped.startswith(BLOCK):
            body = stripped[len(BLOCK) :]
            if len(body) >= len(BLOCK) and body.endswith(BLOCK):  # """one line"""
                return body[: -len(BLOCK)]
            lines = [body] if body else []
            while True:
                nxt = read(CONTINUE)
                if nxt.rstrip().endswith(BLOCK):
                    last = nxt.rstrip()[: -len(BLOCK)]
                    return "\n".join(lines + ([last] if last else []))
                lines.append(nxt)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = read(CONTINUE)
        return "\n".join(lines + [line])
    except KeyboardInterrupt:
        return None
    except EOFError:
        raise _Quit() from None


class Repl:
    """The chat loop on a ``ChatSession``; ``out`` gets everything printed."""

    def __init__(self, session: ChatSession, out: TextIO | None = None, read: Callable[[str], str] = input):
        self.session = session
        self.out = out or sys.stdout
        self.read = read

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def banner(self, title: str) -> None:
        self.say(f"{title}\n/help for commands; Ctrl-C stops a reply; Ctrl-D or /exit leaves.")

    def run(self) -> int:
        while True:
            try:
                text = read_message(self.read)
            except (EOFError, KeyboardInterrupt, _Quit):
                self.say("\nbye")
                return 0
            if text is None:
                self.say("\n(message discarded)")
                continue
            if not text.strip():
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    self.command(text)
                else:
                    self.reply(self.session.send(text[1:] if text.startswith("//") else text))
            except _Quit:
                self.say("bye")
                return 0
            except (ValueError, OSError) as e:  # ChatError, and unreadable or non-UTF-8 files
                self.say(f"error: {e}")

    # -- replies ----------------------------------------------------------------------------
    def reply(self, stream: ReplyStream) -> None:
        """Print a reply as it streams; the first Ctrl-C asks it to stop, a second abandons it at once."""
        if stream.trim.notice:
            self.say(f"[note: {stream.trim.notice}]")
        presses = 0

        def on_sigint(signum, frame):
            nonlocal presses
            presses += 1
            self.session.stop()
            if presses > 1:
                raise KeyboardInterrupt

        # The SIGINT handler only sets a flag: raising inside the model's forward pass would
        # leave a half-built KV cache behind; the decode loop checks the flag after every token.
        main = threading.current_thread() is threading.main_thread()  # signals are the main thread's
        previous = signal.signal(signal.SIGINT, on_sigint) if main else None
        self.say(ASSISTANT, end="")
        deltas = iter(stream)
        try:
            for delta in deltas:
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            pass
        finally:
            deltas.close()  # records the (partial) turn and frees the engine now, not at garbage collection
            if main:
                signal.signal(signal.SIGINT, previous)
        self.say()
        if stream.finish_reason == "cancelled":
            self.say(f"[stopped after {stream.completion_tokens} tokens]")
        elif stream.finish_reason == "length":
            self.say(f"[max_new_tokens ({self.session.gen.max_new_tokens}) reached]")

    # -- commands ---------------------------------------------------------------------------
    def command(self, text: str) -> None:
        name, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/exit", "/quit"):
            raise _Quit()
        if name == "/help":
            self.say(HELP)
        elif name == "/clear":
            s.clear()
            self.say("history cleared")
        elif name == "/undo":
            turn = s.undo()
            self.say(f"removed: {_short(turn[0])}" if turn else "nothing to undo")
        elif name in ("/regen", "/regenerate"):
            self.reply(s.regenerate())
        elif name == "/system":
            if arg:
                s.set_system(None if arg == "-" else arg)
            default = "" if s.system is not None else " (the template's default)"
            self.say(f"system{default}: {s.effective_system or '(none)'}")
        elif name == "/set":
            if not arg:
                self.say("\n".join(f"  {k} = {v}" for k, v in s.settings().items()))
                return
            param, _, value = arg.partition(" ")
            if not value.strip():
                raise ChatError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
            self.say(f"{param.replace('-', '_')} = {s.set(param, value)}")
        elif name == "/adapter":
            if arg:
                s.set_adapter(arg)
            self.say(f"adapter: {s.adapter} (loaded: {', '.join([*s.engine.adapters, 'base'])})")
        elif name == "/history":
            for i, (user, assistant) in enumerate(s.history, 1):
                self.say(f"[{i}] User: {user}\n    Assistant: {assistant}")
            if not s.history:
                self.say("(empty)")
        elif name == "/save":
            if not arg:
                raise ChatError("usage: /save FILE.json")
            self.say(f"saved {len(s.history)} turns to {s.save(arg)}")
        elif name == "/load":
            if not arg:
                raise ChatError("usage: /load FILE.json")
            s.load(arg)
            self.say(f"loaded {len(s.history)} turns from {arg}")
        else:
            self.say(f"unknown command {name}; /help lists them")


def _short(text: str, width: int = 40) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 1] + "…"


def run(session: ChatSession, title: str) -> int:
    """Run the terminal chat on stdin/stdout."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  -- line editing and history for input()
        except ImportError:  # not on every platform; plain input() still works
            pass
    repl = Repl(session)
    repl.banner(title)
    return repl.run()
