"""``chinese-vicuna merge | export-gguf | convert-meta | quantize | verify``: the model-file commands.

Each parser's ``func`` imports its work module lazily, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m")


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
    from ..config import ConfigError
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


def register(subparsers, groups) -> None:
    """Add ``merge``, ``export-gguf``, ``convert-meta``, ``quantize`` and ``verify``."""
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
