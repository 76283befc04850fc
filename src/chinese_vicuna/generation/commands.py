"""``chinese-vicuna generate``: one prompt or a file of prompts through base model + adapters.

Also the decoding flags, generated from ``GenArgs`` (``generation/args.py``), and the ``GenArgs``
they make: shared by every command that generates. Nothing heavy is imported at module level: this
module is loaded for every ``--help``.
"""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path

from ..config import ConfigError, field_docs
from .args import GenArgs, flag_fields


def register(subparsers, groups) -> None:
    """Add ``generate``."""
    p = subparsers.add_parser("generate", help="answer one prompt or a file of prompts with base model + adapters")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    p.add_argument("--adapter", action="append", help="adapter folder, or NAME=DIR; repeatable")
    p.add_argument("--prompt", help="one instruction")
    p.add_argument("--input", help="JSONL/JSON of {instruction, input?} records")
    p.add_argument("--output", help="JSONL output; an existing file is resumed (ids already there are skipped)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--template", default=None, help="override the template saved with the adapter")
    p.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--backend", default="hf", choices=["hf", "llama.cpp"],
                   help="llama.cpp: --model is a .gguf file (export-gguf), run on the CPU")
    add_decoding_flags(p)
    p.set_defaults(func=cmd_generate)


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """The decoding flags shared by ``generate``, ``eval compare``, ``chat`` and ``webui``: one per
    ``GenArgs`` field (``--max-new-tokens`` for ``max_new_tokens``), its default and help from the field."""
    docs = field_docs(GenArgs)
    hints = typing.get_type_hints(GenArgs)
    g = p.add_argument_group("decoding")
    for f in flag_fields():
        flag, doc = "--" + f.name.replace("_", "-"), docs.get(f.name, "").replace("``", "")
        if hints[f.name] is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            g.add_argument(flag, action=action, default=f.default, help=doc)
            continue
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        default = "" if f.default is None else f" (default {f.default})"
        g.add_argument(flag, type=kind, default=f.default, help=doc + default)


def gen_args(args: argparse.Namespace) -> GenArgs:
    """The ``GenArgs`` of the decoding flags (every flag field, none dropped)."""
    return GenArgs(**{f.name: getattr(args, f.name) for f in flag_fields()})


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from tqdm.auto import tqdm

    from ..data.datasets import read_prompts
    from .decode import generate_batch, instruction_conversation
    from .engine import LlamaCppEngine, load_engine

    if not args.prompt and not args.input:
        raise ConfigError("generate: give --prompt TEXT or --input prompts.jsonl")
    engine = load_engine(args.backend, args.model, args.adapter or [], template=args.template,
                         quantization=args.quantization)
    gen = gen_args(args)

    def answer(convs):
        if isinstance(engine, LlamaCppEngine):  # one prompt at a time through llama.cpp
            return [engine.generate(c, gen).text.strip() for c in convs]
        return generate_batch(engine.model, engine.renderer(), convs, gen)

    if args.prompt:
        print(answer([instruction_conversation(args.prompt)])[0])
        return 0
    prompts = read_prompts(args.input)
    done: set[int] = set()
    out = Path(args.output) if args.output else None
    if out and out.exists():  # resumable: keep what is there, skip those ids
        done = {json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines() if line.strip()}
    todo = [(i, p) for i, p in enumerate(prompts) if i not in done]
    sink = open(out, "a", encoding="utf-8") if out else None
    try:
        for start in tqdm(range(0, len(todo), args.batch_size), desc="generating", unit="batch"):
            chunk = todo[start : start + args.batch_size]
            replies = answer([instruction_conversation(i, c) for _, (i, c) in chunk])
            for (idx, (ins, ctx)), reply in zip(chunk, replies):
                row = {"id": idx, "instruction": ins, "input": ctx, "output": reply}
                if sink:
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                    sink.flush()
                else:
                    print(json.dumps(row, ensure_ascii=False))
    finally:
        if sink:
            sink.close()
    return 0
