"""``chinese-vicuna board``: flags and entry point (argparse only at import: loaded for every ``--help``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...access import is_loopback, parse_auth


def register(subparsers, groups) -> None:
    """Add the ``board`` command."""
    p = subparsers.add_parser(
        "board",
        help="the whole workflow in a browser: model, data, train (live loss), evaluate, chat, export",
        description="A Gradio app on 127.0.0.1: pick a base and data, train (as a separate `chinese-vicuna train` "
        "process), watch the loss, compare answers, chat with the adapter, merge / export GGUF. Paths typed "
        "into the page must lie in the working directory or a --data-root / --output-root.",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="a folder outside the working directory whose files the page may read; repeatable")
    p.add_argument("--output-root", action="append", default=[], metavar="DIR",
                   help="where runs are listed and may be written (default: outputs); repeatable")
    p.set_defaults(func=cmd_board)


def cmd_board(args: argparse.Namespace, extra: list[str]) -> int:
    from ...model.load import cache_dir
    from .app import Board
    from .paths import PathGuard
    from .ui import launch

    auth = parse_auth(args.auth)
    if not is_loopback(args.host) and auth is None:
        print(f"warning: serving on {args.host} without --auth: anyone who can reach it can train and read "
              "files in the allowed folders", file=sys.stderr)
    workdir = Path.cwd()
    outputs = args.output_root or ["outputs"]
    guard = PathGuard(workdir, data_roots=args.data_root, output_roots=outputs, model_roots=[cache_dir()])
    board = Board(guard, guard.output_roots, host=args.host, auth=auth)
    return launch(board, port=args.port)
