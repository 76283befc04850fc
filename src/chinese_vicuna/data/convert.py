"""``chinese-vicuna data convert``: domain Q&A corpora -> instruction records with one fixed prompt.

- ``cmedqa``: cMedQA2's ``question.csv`` (``question_id,content``) and ``answer.csv``
  (``ans_id,question_id,content``), joined on ``question_id``.
- ``lawyer``: Lawyer-LLaMA / CAIL style JSON or JSONL records with ``question``/``answer``,
  ``input``/``output`` or ``instruction``/``output`` keys.

Every output record is ``{"instruction": PROMPT, "input": question, "output": answer}``, the format
of ``data/samples/medical.jsonl`` and ``legal.jsonl``, and what ``configs/continue-*.yaml`` train on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .datasets import DataError, iter_records

MEDICAL_PROMPT = "扮演一个专业的医生并回答病人的问题。"
LEGAL_PROMPT = "扮演一个专业的律师并回答当事人的问题。"


def _read_csv(path: str | os.PathLike, columns: tuple[str, ...]) -> list[tuple[str, dict[str, str]]]:
    """``(file:line, row)`` for every row, after checking the header and that the cells are non-empty."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for col in columns:
                if col not in header:
                    raise DataError(
                        f"{p}:1: {col}: expected a column named {col!r} (header: {','.join(header)})"
                    )
            rows = []
            for row in tqdm(reader, desc=p.name, unit=" rows", leave=False):
                where = f"{p}:{reader.line_num}"
                for col in columns:
                    if not (row.get(col) or "").strip():
                        raise DataError(f"{where}: {col}: expected a non-empty value")
                rows.append((where, row))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (byte {e.start}); expected UTF-8 text") from None
    return rows


def cmedqa_records(questions: str, answers: str, per_question: int = 1) -> tuple[list[dict], dict[str, int]]:
    """Medical instruction records from cMedQA2 CSVs; at most ``per_question`` answers per question (0: all).

    Returns:
        The records (in question-file order, answers in answer-file order) and counts
        (``questions``, ``answers``, ``unanswered``, ``records``).
    """
    qs: dict[str, str] = {}
    for where, row in _read_csv(questions, ("question_id", "content")):
        qid = row["question_id"].strip()
        if qid in qs:
            raise DataError(f"{where}: question_id: expected a unique id, got {qid!r} twice")
        qs[qid] = row["content"].strip()
    by_q: dict[str, list[str]] = {}
    rows = _read_csv(answers, ("ans_id", "question_id", "content"))
    for where, row in rows:
        qid = row["question_id"].strip()
        if qid not in qs:
            raise DataError(f"{where}: question_id: expected an id from {questions}, got {qid!r}")
        by_q.setdefault(qid, []).append(row["content"].strip())
    records = []
    for qid, question in qs.items():
        picked = by_q.get(qid, [])
        for answer in picked[:per_question] if per_question > 0 else picked:
            records.append({"instruction": MEDICAL_PROMPT, "input": question, "output": answer})
    stats = {
        "questions": len(qs),
        "answers": len(rows),
        "unanswered": len(qs) - len(by_q),
        "records": len(records),
    }
    return records, stats


def _text(where: str, record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else type(value).__name__
        raise DataError(f"{where}: {key}: expected a non-empty string, got {got}")
    return value.strip()


def lawyer_records(path: str) -> list[dict]:
    """Legal instruction records from Lawyer-LLaMA / CAIL style JSON or JSONL.

    ``question``/``answer`` is used when present; otherwise ``output`` is the answer and the question is
    ``instruction`` and ``input`` joined by a newline (either may be missing or empty).
    """
    records = []
    for where, r in tqdm(iter_records(path), desc=Path(path).name, unit=" records", leave=False):
        if not isinstance(r, dict):
            raise DataError(f"{where}: record: expected a JSON object, got {type(r).__name__}")
        if "question" in r or "answer" in r:
            question, answer = _text(where, r, "question"), _text(where, r, "answer")
        elif "output" in r:
            answer = _text(where, r, "output")
            parts = []
            for key in ("instruction", "input"):
                value = r.get(key)
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{where}: {key}: expected a string, got {type(value).__name__}")
                if value and value.strip():
                    parts.append(value.strip())
            question = "\n".join(parts)
            if not question:
                raise DataError(f"{where}: input: expected a non-empty question in instruction or input")
        else:
            raise DataError(
                f"{where}: answer: expected question/answer, input/output or instruction/output keys, "
                f"got {', '.join(map(str, r)) or 'none'}"
            )
        records.append({"instruction": LEGAL_PROMPT, "input": question, "output": answer})
    if not records:
        raise DataError(f"{path}: no records found")
    return records


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, p)


def cmd_cmedqa(args: argparse.Namespace, extra: list[str]) -> int:
    records, stats = cmedqa_records(args.questions, args.answers, args.answers_per_question)
    write_jsonl(args.out, records)
    print(
        f"{stats['records']} records from {stats['questions']} questions and {stats['answers']} answers "
        f"({stats['unanswered']} questions without an answer skipped) written to {args.out}"
    )
    return 0


def cmd_lawyer(args: argparse.Namespace, extra: list[str]) -> int:
    records = lawyer_records(args.input)
    write_jsonl(args.out, records)
    print(f"{len(records)} records written to {args.out}")
    return 0


def register(subparsers, groups) -> None:
    """Add ``data convert cmedqa`` and ``data convert lawyer``."""
    p = groups["data"].add_parser(
        "convert", help="domain corpora (cMedQA2, Lawyer-LLaMA/CAIL) -> instruction JSONL"
    )
    csub = p.add_subparsers(dest="convert_command", metavar="FORMAT", required=True)
    q = csub.add_parser("cmedqa", help=f"cMedQA2 CSVs -> medical records (instruction: {MEDICAL_PROMPT})")
    q.add_argument("--questions", required=True, help="question.csv: question_id,content")
    q.add_argument("--answers", required=True, help="answer.csv: ans_id,question_id,content")
    q.add_argument("--out", required=True, help="output JSONL")
    q.add_argument(
        "--answers-per-question", type=int, default=1, help="records per question, one per answer (0: all)"
    )
    q.set_defaults(func=cmd_cmedqa)
    q = csub.add_parser(
        "lawyer", help=f"Lawyer-LLaMA/CAIL JSON(L) -> legal records (instruction: {LEGAL_PROMPT})"
    )
    q.add_argument(
        "--input",
        required=True,
        help="JSON array or JSONL with question/answer, input/output or instruction/output",
    )
    q.add_argument("--out", required=True, help="output JSONL")
    q.set_defaults(func=cmd_lawyer)
