"""``chinese-vicuna chat`` (terminal) and ``chinese-vicuna webui`` (Gradio): flags and entry points.

Nothing heavy is imported at module level: this module is loaded for every ``--help``.
"""

from __future__ import annotations

import argparse
import sys

from ..access import is_loopback, parse_auth
from ..config import ConfigError
from ..generation.args import flag_fields
from ..generation.commands import add_decoding_flags


def register(subparsers, groups) -> None:
    """Add the ``chat`` and ``webui`` commands."""
    p = subparsers.add_parser(
        "chat",
        help="terminal chat with base model + adapters (streaming, /commands, Ctrl-C stops a reply)",
        description="Multi-turn chat in the terminal. Type /help inside for the commands.",
    )
    _add_model_flags(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser(
        "webui",
        help="browser chat UI (Gradio) with sliders for every decoding setting",
        description="A Gradio chat UI on 127.0.0.1 (streaming, Stop / Undo / Regenerate / Clear / Save).",
    )
    _add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.set_defaults(func=cmd_webui)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="base model (default: the base recorded with the first adapter, else the embedded SmolLM2)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="adapter folder, optionally named; repeatable (the first one answers)")
    p.add_argument("--template", default=None,
                   help="alpaca, vicuna-chat or auto (default: the template saved with the adapter)")
    p.add_argument("--system", default=None, help="system prompt / global instruction")
    p.add_argument("--max-memory", type=int, default=None,
                   help="token budget of the prompt (history is trimmed to it; default: the model context)")
    p.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--backend", default="hf", choices=["hf", "llama.cpp"],
                   help="hf: transformers + peft; llama.cpp: a GGUF model via llama-cpp-python")
    add_decoding_flags(p)


def load_engine(args: argparse.Namespace):
    """The generation backend for ``--backend`` (see ``generation.engine.load_engine``)."""
    from ..generation.engine import load_engine as load

    return load(args.backend, args.model, args.adapter, template=args.template, quantization=args.quantization)


def make_session(args: argparse.Namespace, engine=None):
    """A ChatSession from the flags (every setting goes through ``ChatSession.set``'s checks)."""
    from .session import ChatError, ChatSession

    session = ChatSession(engine if engine is not None else load_engine(args), system=args.system)
    values = {f.name: getattr(args, f.name) for f in flag_fields()}
    values["max_memory"] = args.max_memory
    try:
        for key, value in values.items():
            session.set(key, value)
        session.budget()
    except ChatError as e:
        raise ConfigError(str(e)) from None
    return session


def _title(session) -> str:
    eng = session.engine
    return (f"chinese-vicuna chat: {eng.name}" + (f" + {session.adapter}" if eng.adapters else "")
            + f", template {session.template.name}")


def cmd_chat(args: argparse.Namespace, extra: list[str]) -> int:
    from .repl import run

    session = make_session(args)
    return run(session, _title(session))


def cmd_webui(args: argparse.Namespace, extra: list[str]) -> int:
    from .webui import launch

    auth = parse_auth(args.auth)
    if not is_loopback(args.host) and auth is None:
        print(f"warning: serving on {args.host} without --auth: anyone who can reach it can use it",
              file=sys.stderr)
    session = make_session(args)  # checks the flags and loads the model once
    return launch(session, host=args.host, port=args.port, auth=auth)
