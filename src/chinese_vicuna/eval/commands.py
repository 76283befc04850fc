"""``chinese-vicuna eval compare | ceval | cmmlu | ppl | compare-results``: parsers and the functions they run.

``eval compare`` (generations side by side) shares the decoding flags of ``generate``
(``generation/commands.py``); its work is in :mod:`chinese_vicuna.eval.compare`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError
from ..generation.commands import add_decoding_flags, gen_args


def _template(args: argparse.Namespace, meta: dict, tokenizer):
    """The instruction template for ``--with-prompt``: --template, else the adapter's, else alpaca."""
    if not args.with_prompt:
        return None
    from ..data.templates import get_template

    name = args.template or meta.get("template") or "alpaca"
    return get_template(name, tokenizer, meta.get("system_prompt") if not args.template else None)


def run_benchmark(bench, args: argparse.Namespace) -> int:
    from ..model.adapters import load_for_inference
    from .benchmarks import evaluate, print_table, submission, write_json
    from .mcq import check_shots

    check_shots(args.shots)
    if args.template and not args.with_prompt:
        raise ConfigError("--template: only used with --with-prompt")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected 1 or more, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: expected 1 or more questions per subject, got {args.limit}")
    data, split = Path(args.data), args.split
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    subjects = subjects or bench.discover(data, split)
    for s in subjects:  # every file checked before a model is loaded
        bench.read(data, split, s)
        bench.examples(data, s, args.shots)
    model, tok, meta = load_for_inference(args.model, args.adapter or [])
    template = _template(args, meta, tok)
    result = evaluate(model, tok, bench, data, subjects, split, args.shots, template, args.generate,
                      args.max_new_tokens, args.limit, args.batch_size)  # fmt: skip
    result.update(model=args.model, adapters=args.adapter or [])
    print_table(bench, result)
    if getattr(args, "submission", None):
        write_json(args.submission, submission(result))
        print(f"submission written to {args.submission}")
    if args.output:
        write_json(args.output, result)
        print(f"written to {args.output}")
    avg = result["average"]
    print("average accuracy: " + (f"{100 * avg:.1f}%" if avg is not None else f"- (the {split} split has no answers)"))
    return 0


def cmd_ceval(args: argparse.Namespace, extra: list[str]) -> int:
    from .ceval import CEVAL

    return run_benchmark(CEVAL, args)


def cmd_cmmlu(args: argparse.Namespace, extra: list[str]) -> int:
    from .cmmlu import CMMLU

    return run_benchmark(CMMLU, args)


def cmd_compare_results(args: argparse.Namespace, extra: list[str]) -> int:
    from .benchmarks import compare_table, load_result, print_compare
    from .ceval import CEVAL
    from .cmmlu import CMMLU

    a, b = load_result(args.a), load_result(args.b)
    names = (Path(args.a).stem, Path(args.b).stem)
    if names[0] == names[1]:
        names = (str(args.a), str(args.b))
    print_compare(compare_table(a, b, names, {"ceval": CEVAL, "cmmlu": CMMLU}), names)
    return 0


def cmd_ppl(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.adapters import load_for_inference
    from ..model.vocab import read_texts
    from .benchmarks import write_json
    from .perplexity import check_window, perplexity

    check_window(args.window, args.stride)
    text = "\n\n".join(read_texts([args.data]))
    model, tok, _ = load_for_inference(args.model, args.adapter or [])
    result = perplexity(model, tok, text, window=args.window, stride=args.stride)
    result.update(data=args.data, model=args.model, adapters=args.adapter or [])
    print(
        f"perplexity {result['ppl']:.3f} over {result['scored_tokens']} tokens "
        f"({result['bits_per_char']:.3f} bits per character)"
    )
    if args.output:
        write_json(args.output, result)
        print(f"written to {args.output}")
    return 0


def cmd_eval_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data.datasets import read_prompts
    from . import compare as cmp

    prompts = read_prompts(args.input, args.limit)
    refs = cmp.read_references(args.reference, prompts) if args.reference else None
    columns = cmp.compare(prompts, args.adapter or [], args.model, gen_args(args), args.template)
    cmp.print_side_by_side(prompts, columns)
    scores = cmp.reference_scores(columns, refs) if refs else None
    if scores:
        cmp.print_scores(scores)
    if args.output:
        cmp.write_results(args.output, prompts, columns, refs, scores)
        print(f"written to {args.output}")
    return 0


def _benchmark_parser(groups, name: str, help: str, layout: str, splits: list[str], default: str):
    q = groups["eval"].add_parser(name, help=help, description=help)
    q.add_argument("--data", required=True, help=f"benchmark folder: {layout}")
    q.add_argument("--model", default=None, help="base model (default: the adapter's base, else embedded SmolLM2)")
    q.add_argument("--adapter", action="append", help="adapter folder; repeatable (the first is active)")
    q.add_argument("--subjects", default=None, help="comma-separated subjects (default: every file of the split)")
    q.add_argument("--shots", type=int, default=0, help="solved dev examples before each question (0..5)")
    q.add_argument("--split", default=default, choices=splits)
    q.add_argument("--limit", type=int, default=None, help="at most N questions per subject")
    q.add_argument("--with-prompt", action="store_true",
                   help="wrap each question in the instruction template (for instruction-tuned models)")
    q.add_argument("--template", default=None,
                   help="template for --with-prompt (default: the adapter's, else alpaca)")
    q.add_argument("--generate", action="store_true",
                   help="parse the first answer letter from generated text instead of comparing letter logits")
    q.add_argument("--max-new-tokens", type=int, default=16, help="with --generate")
    q.add_argument("--batch-size", type=int, default=8, help="questions per forward pass")
    q.add_argument("--output", default=None, help="results JSON (written atomically)")
    return q


def register(subparsers, groups) -> None:
    """Add ``eval compare``, ``eval ceval``, ``eval cmmlu``, ``eval ppl`` and ``eval compare-results``."""
    q = groups["eval"].add_parser("compare", help="same prompts through the base model and each adapter, side by side")
    q.add_argument("--input", required=True, help="JSONL/JSON of {instruction, input?} records")
    q.add_argument("--adapter", action="append", help="adapter folder, or NAME=DIR; repeatable")
    q.add_argument("--model", default=None)
    q.add_argument("--template", default=None)
    q.add_argument("--limit", type=int, default=None)
    q.add_argument("--output", default=None, help="write a .md table or .json")
    q.add_argument("--reference", default=None,
                   help="JSON/JSONL of {instruction, input?, reference|output}: score each column's answers "
                        "(character F1, ROUGE-L)")  # fmt: skip
    add_decoding_flags(q)
    q.set_defaults(func=cmd_eval_compare)
    q = _benchmark_parser(groups, "ceval", "C-Eval multiple-choice accuracy (zero/few-shot)",
                          "{dev,val,test}/<subject>_<split>.csv", ["dev", "val", "test"], "val")  # fmt: skip
    q.add_argument("--submission", default=None,
                   help="write predictions in C-Eval's submission format ({subject: {id: letter}}), e.g. for --split test")  # fmt: skip
    q.set_defaults(func=cmd_ceval)
    q = _benchmark_parser(groups, "cmmlu", "CMMLU multiple-choice accuracy (zero/few-shot)",
                          "{dev,test}/<subject>.csv", ["dev", "test"], "test")  # fmt: skip
    q.set_defaults(func=cmd_cmmlu)

    q = groups["eval"].add_parser("compare-results", help="per-category accuracy of two ceval/cmmlu result JSONs")
    q.add_argument("a", help="results JSON (--output of eval ceval / eval cmmlu)")
    q.add_argument("b", help="results JSON to compare with A")
    q.set_defaults(func=cmd_compare_results)

    q = groups["eval"].add_parser("ppl", help="perplexity with the sliding-window method")
    q.add_argument("--data", required=True, help=".txt or JSON/JSONL (text fields), scored as one stream")
    q.add_argument("--model", default=None)
    q.add_argument("--adapter", action="append", help="adapter folder; repeatable (the first is active)")
    q.add_argument("--window", type=int, default=512, help="tokens per forward pass")
    q.add_argument("--stride", type=int, default=256, help="window step; only the last STRIDE tokens are scored")
    q.add_argument("--output", default=None, help="results JSON (written atomically)")
    q.set_defaults(func=cmd_ppl)
