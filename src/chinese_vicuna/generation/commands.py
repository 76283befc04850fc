"""``chinese-vicuna generate``: one prompt or a file of prompts through base model + adapters.

Also the decoding flags and their ``GenArgs``, shared by every command that generates. Only
argparse is imported at module level: this module is loaded for every ``--help``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ConfigError


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
    """The decoding flags shared by ``generate``, ``eval compare``, ``chat`` and ``webui``."""
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy / beam search)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--repetition-penalty", type=float, default=1.1)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)


def gen_args(args: argparse.Namespace):
    """The ``GenArgs`` of the decoding flags."""
    from .decode import GenArgs

    return GenArgs(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        seed=args.seed,
    )


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
