"""``chinese-vicuna vocab train|extend|report|resize``: the Chinese vocabulary-extension commands.

The work is in :mod:`chinese_vicuna.model.vocab`; this module only parses flags and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from ..config import ConfigError


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.vocab import read_texts, train_sentencepiece

    if not 0 <= args.holdout < 1:
        raise ConfigError(f"--holdout: expected a fraction in [0, 1), got {args.holdout}")
    texts = read_texts(args.input)
    held: list[str] = []
    if args.holdout:
        # A seeded shuffle, so the held-out part is spread over the corpus, not its last topics.
        order = list(range(len(texts)))
        random.Random(args.seed).shuffle(order)
        n = max(1, round(len(texts) * args.holdout))
        if n >= len(texts):
            raise ConfigError(f"--holdout {args.holdout} leaves no training text ({len(texts)} samples)")
        held = [texts[i] for i in sorted(order[:n])]
        texts = [texts[i] for i in sorted(order[n:])]
    out = Path(args.out)
    model = train_sentencepiece(
        texts,
        out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        prefix=args.prefix,
        verbose=args.verbose,
    )
    if held:
        tmp = out / "heldout.txt.tmp"
        tmp.write_text("\n\n".join(held) + "\n", encoding="utf-8")
        os.replace(tmp, out / "heldout.txt")
    from ..model.vocab import sp_pieces

    print(f"trained on {len(texts)} samples: {model} ({len(sp_pieces(model))} pieces)")
    if held:
        print(f"held out {len(held)} samples: {out / 'heldout.txt'}")
    return 0


def cmd_extend(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.load import resolve_base_model
    from ..model.vocab import extend_tokenizer

    r = extend_tokenizer(resolve_base_model(args.base), args.sp_model, args.out, args.method)
    print(
        f"{r.method}: {r.old_size} -> {r.new_size} tokens (+{r.added}; {r.skipped_present} already present"
        + (f", {r.skipped_ascii} with ASCII skipped" if r.skipped_ascii else "")
        + f") written to {args.out}"
    )
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..model.load import load_tokenizer, resolve_base_model
    from ..model.vocab import read_texts, token_report

    texts = read_texts([args.text])
    rep = token_report(load_tokenizer(resolve_base_model(args.base)), load_tokenizer(args.new), texts)
    table = Table(title=f"{args.text}: {rep['samples']} samples, {rep['chinese_chars']} Chinese characters")
    for col in ("tokenizer", "vocab", "tokens", "tokens / Chinese char", "tokens / sample"):
        table.add_column(col, justify="left" if col == "tokenizer" else "right")
    for name in ("base", "new"):
        r = rep[name]
        table.add_row(
            name,
            str(r["vocab_size"]),
            str(r["tokens"]),
            f"{r['tokens_per_chinese_char']:.3f}",
            f"{r['tokens_per_sample']:.1f}",
        )
    Console().print(table)
    print(f"reduction: {rep['reduction_pct']:.1f}% fewer tokens")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(rep, ensure_ascii=False, indent=2), encoding="utf-8")
        os.replace(tmp, out)
    return 0


def cmd_resize(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.load import resolve_base_model
    from ..model.vocab import resize_model_folder

    out, n = resize_model_folder(resolve_base_model(args.base), args.tokenizer, args.out)
    print(f"{n} new embedding rows initialised; model written to {out}")
    return 0


def register(subparsers, groups) -> None:
    """Add the ``vocab`` command group."""
    p = subparsers.add_parser("vocab", help="Chinese vocabulary extension: train, extend, report, resize")
    vsub = p.add_subparsers(dest="vocab_command", metavar="SUBCOMMAND", required=True)

    q = vsub.add_parser("train", help="train a Chinese SentencePiece model on text")
    q.add_argument("--input", nargs="+", required=True, help=".txt (paragraphs) or JSON/JSONL files")
    q.add_argument("--out", required=True, help="output folder (PREFIX.model, PREFIX.vocab)")
    q.add_argument("--vocab-size", type=int, default=6000)
    q.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    q.add_argument("--character-coverage", type=float, default=0.9995)
    q.add_argument("--prefix", default="zh_sp", help="model file name prefix")
    q.add_argument(
        "--holdout", type=float, default=0.0, help="fraction of samples kept out, written to OUT/heldout.txt"
    )
    q.add_argument("--seed", type=int, default=42, help="seeds the held-out choice")
    q.add_argument("--verbose", action="store_true", help="show sentencepiece's log")
    q.set_defaults(func=cmd_train)

    q = vsub.add_parser("extend", help="merge a SentencePiece model's pieces into a base tokenizer")
    q.add_argument("--base", default=None, help="model or tokenizer folder (default: embedded SmolLM2)")
    q.add_argument("--sp-model", required=True, help="the .model file from `vocab train`")
    q.add_argument("--out", required=True, help="output tokenizer folder")
    q.add_argument(
        "--method",
        default="auto",
        choices=["auto", "sp", "added"],
        help="sp: protobuf merge into tokenizer.model (LLaMA); added: regular added tokens (any fast "
        "tokenizer); auto: sp when the base has tokenizer.model",
    )
    q.set_defaults(func=cmd_extend)

    q = vsub.add_parser("report", help="tokens per Chinese character and per sample, before/after")
    q.add_argument("--base", default=None, help="base tokenizer/model folder (default: embedded SmolLM2)")
    q.add_argument("--new", required=True, help="extended tokenizer folder")
    q.add_argument("--text", required=True, help="held-out text: .txt paragraphs or JSON/JSONL")
    q.add_argument("--output", default=None, help="also write the numbers as JSON")
    q.set_defaults(func=cmd_report)

    q = vsub.add_parser(
        "resize", help="resize + initialise embeddings/lm_head for a new tokenizer; save a model folder"
    )
    q.add_argument("--base", default=None, help="base model folder (default: embedded SmolLM2)")
    q.add_argument("--tokenizer", required=True, help="extended tokenizer folder (from `vocab extend`)")
    q.add_argument("--out", required=True, help="output model folder (safetensors + tokenizer)")
    q.set_defaults(func=cmd_resize)
