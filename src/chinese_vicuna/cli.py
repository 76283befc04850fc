"""``chinese-vicuna``: the command table (each package registers its commands in its ``commands.py``),
the parser setup and the error handling.

Heavy libraries are imported inside each command, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from .config import ConfigError

# The packages that add subcommands, in --help order. Each ``commands.py`` exposes
# ``register(subparsers, groups)`` (groups: the ``data`` and ``eval`` sub-command parsers) and adds
# parsers whose ``func(args, extra) -> int`` does the work; heavy imports stay inside ``func`` so
# that ``--help`` stays instant.
COMMAND_MODULES: tuple[str, ...] = (
    "train.commands",  # train, plan
    "tools.commands",  # import, data inspect, merge, export-gguf, convert-meta, quantize, verify, vocab
    "data.commands",  # data convert
    "generation.commands",  # generate
    "eval.commands",  # eval compare | ceval | cmmlu | ppl | compare-results
    "chat.commands",  # chat, webui
    "serve.commands",  # serve
    "serve.board.commands",  # board
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chinese-vicuna",
        description="Turn a LLaMA-family model into a Chinese instruction/chat model with LoRA/QLoRA.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {
        "data": sub.add_parser("data", help="data tools").add_subparsers(
            dest="data_command", metavar="SUBCOMMAND", required=True),
        "eval": sub.add_parser("eval", help="evaluation").add_subparsers(
            dest="eval_command", metavar="SUBCOMMAND", required=True),
    }
    for name in COMMAND_MODULES:
        importlib.import_module(f"chinese_vicuna.{name}").register(sub, groups)
    return parser


def _user_error(e: BaseException) -> bool:
    """Errors that mean "fix your input": printed as one line, exit code 2, no traceback.

    The classes are looked up lazily so that ``--help`` never imports torch.
    """
    from .data.datasets import DataError
    from .data.formats import RecordError
    from .data.templates import TemplateError

    kinds: tuple[type, ...] = (ConfigError, DataError, RecordError, TemplateError, FileNotFoundError)
    load = sys.modules.get("chinese_vicuna.model.load")
    if load is not None:
        kinds += (load.ModelLoadError,)
    return isinstance(e, kinds)


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes logs a warning about optional CPU kernels on every import, and peft trips a
    # transformers deprecation warning when it loads an adapter: noise for our users.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    parser = build_parser()
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
        # `train [CONFIG] --key value ...`: every flag is a config key, so argparse only sees CONFIG.
        rest = argv[1:]
        config = rest.pop(0) if rest and not rest[0].startswith("-") else None
        args, extra = parser.parse_args(["train"] + ([config] if config else [])), rest
    elif argv[:1] == ["plan"] and not {"-h", "--help"} & set(argv):
        # `plan [CONFIG] [--device-memory X] --key value ...`: the train command's flags plus the planner's own
        from .train.plan import split_argv

        mine, extra = split_argv(argv[1:])
        args = parser.parse_args(["plan"] + mine)
    else:
        args, extra = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    if extra and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # the command is this process's own (the console script, python -m), not a call from other code:
    # `train` may then re-execute the process (to choose its C allocator)
    args.process_entry = argv_given is None
    try:
        return args.func(args, extra)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
