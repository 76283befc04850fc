"""``chinese-vicuna data convert cmedqa | lawyer | cail``: flags and entry points.

The work is in ``data/convert.py`` and ``data/cail.py``; only argparse and the light record
modules are imported here (this module is loaded for every ``--help``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .cail import CAIL_PROMPT
from .convert import (
    LEGAL_PROMPT,
    MEDICAL_PROMPT,
    PATIENT_PREFIX,
    as_chat,
    cmedqa_paper_records,
    cmedqa_records,
    lawyer_records,
    write_jsonl,
)


def cmd_cmedqa(args: argparse.Namespace, extra: list[str]) -> int:
    if args.style == "paper":
        records, stats = cmedqa_paper_records(args.questions, args.answers, args.answers_per_question or 0)
        merged = f", {stats['merged']} repeated questions merged"
    else:
        per_question = 1 if args.answers_per_question is None else args.answers_per_question
        records, stats = cmedqa_records(args.questions, args.answers, per_question)
        merged = ""
    write_jsonl(args.out, records)
    print(
        f"{stats['records']} records from {stats['questions']} questions and {stats['answers']} answers "
        f"({stats['unanswered']} questions without an answer skipped{merged}) written to {args.out}"
    )
    return 0


def _report(records: list[dict], skipped: list[str], out: str) -> None:
    for message in skipped[:5]:
        print(f"skipped: {message}")
    more = f" ({len(skipped)} bad records skipped)" if skipped else ""
    print(f"{len(records)} records written to {out}{more}")


def _convert_legal(args: argparse.Namespace, read: Callable[..., list[dict]]) -> int:
    """``lawyer`` / ``cail``: read (skipping bad records if asked), write alpaca or chat records, report."""
    skipped: list[str] = []
    records = read(args.input, args.on_bad_record, skipped)
    write_jsonl(args.out, [as_chat(r) for r in records] if args.format == "chat" else records)
    _report(records, skipped, args.out)
    return 0


def cmd_lawyer(args: argparse.Namespace, extra: list[str]) -> int:
    return _convert_legal(args, lawyer_records)


def cmd_cail(args: argparse.Namespace, extra: list[str]) -> int:
    from .cail import cail_records

    return _convert_legal(args, cail_records)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=("alpaca", "chat"),
        default="alpaca",
        help="alpaca: {instruction, input, output} (default); chat: Chinese-Vicuna chat records "
        "{input: [question], output: [answer]} for the vicuna-chat template",
    )
    p.add_argument(
        "--on-bad-record",
        "--on_bad_record",
        dest="on_bad_record",
        choices=("error", "skip"),
        default="error",
        help="error: stop at the first bad record (default); skip: leave bad records out and count them",
    )


def register(subparsers, groups) -> None:
    """Add ``data convert cmedqa``, ``data convert lawyer`` and ``data convert cail``."""
    p = groups["data"].add_parser(
        "convert", help="domain corpora (cMedQA2, Lawyer-LLaMA, CAIL2018) -> instruction JSONL"
    )
    csub = p.add_subparsers(dest="convert_command", metavar="FORMAT", required=True)
    q = csub.add_parser("cmedqa", help=f"cMedQA2 CSVs -> medical records (instruction: {MEDICAL_PROMPT})")
    q.add_argument("--questions", required=True, help="question.csv: question_id,content")
    q.add_argument("--answers", required=True, help="answer.csv: ans_id,question_id,content")
    q.add_argument("--out", required=True, help="output JSONL")
    q.add_argument(
        "--style",
        choices=("separate", "paper"),
        default="separate",
        help="separate: one record per answer, input = the question (default); paper: one record per "
        f"question as the Chinese-Vicuna paper trained, input = '{PATIENT_PREFIX}' + question, output = "
        "all doctors' answers numbered '1.…\\n2.…\\n', repeated questions merged",
    )
    q.add_argument(
        "--answers-per-question",
        type=int,
        default=None,
        help="separate: records per question, one per answer (default 1; 0: all); "
        "paper: answers merged into each reply (default 0: all)",
    )
    q.set_defaults(func=cmd_cmedqa)
    q = csub.add_parser("lawyer", help=f"Lawyer-LLaMA JSON(L) -> legal records (instruction: {LEGAL_PROMPT})")
    q.add_argument(
        "--input",
        required=True,
        help="JSON array or JSONL with question/answer, input/output or instruction/output",
    )
    q.add_argument("--out", required=True, help="output JSONL")
    _output_options(q)
    q.set_defaults(func=cmd_lawyer)
    q = csub.add_parser(
        "cail",
        help=f"raw CAIL2018 cases -> legal records (instruction: {CAIL_PROMPT})",
        description="Each case becomes {instruction, input: fact, output}; the output reads "
        "'罪名：盗窃罪。相关法条：第264条。刑期：6个月。' (+ '罚金：N元。' when fined).",
    )
    q.add_argument(
        "--input",
        required=True,
        help="a CAIL2018 file (one JSON case per line, as CAIL ships its .json files) or a folder of them",
    )
    q.add_argument("--out", required=True, help="output JSONL")
    _output_options(q)
    q.set_defaults(func=cmd_cail)
