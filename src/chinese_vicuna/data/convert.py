"""``chinese-vicuna data convert``: domain corpora -> instruction records with one fixed prompt.

- ``cmedqa``: cMedQA2's ``question.csv`` (``question_id,content``) and ``answer.csv``
  (``ans_id,question_id,content``), joined on ``question_id``. ``--style separate`` (the default)
  makes one record per answer; ``--style paper`` makes one record per question as Chinese-Vicuna's
  medical model was trained: input ``病人：{question}``, the doctors' answers merged into one
  numbered reply ``1.{a1}\\n2.{a2}\\n``.
- ``lawyer``: Lawyer-LLaMA style JSON or JSONL records with ``question``/``answer``,
  ``input``/``output`` or ``instruction``/``output`` keys.
- ``cail``: raw CAIL2018 criminal cases -> the fact as input and a one-line verdict as output
  (``data/cail.py``).

Every output record is ``{"instruction": PROMPT, "input": ..., "output": ...}``, the format of
``data/samples/medical.jsonl`` and ``legal.jsonl``, and what ``configs/continue-*.yaml`` train on;
``lawyer``/``cail --format chat`` write one-turn Chinese-Vicuna chat records instead (:func:`as_chat`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .datasets import DataError, collect_records, iter_records, text_field

MEDICAL_PROMPT = "扮演一个专业的医生并回答病人的问题。"
LEGAL_PROMPT = "扮演一个专业的律师并回答当事人的问题。"
PATIENT_PREFIX = "病人："


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


def _cmedqa_answers(questions: str, answers: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Question text by id, and ``(question_id, answer text)`` in answer-file order."""
    qs: dict[str, str] = {}
    for where, row in _read_csv(questions, ("question_id", "content")):
        qid = row["question_id"].strip()
        if qid in qs:
            raise DataError(f"{where}: question_id: expected a unique id, got {qid!r} twice")
        qs[qid] = row["content"].strip()
    pairs = []
    for where, row in _read_csv(answers, ("ans_id", "question_id", "content")):
        qid = row["question_id"].strip()
        if qid not in qs:
            raise DataError(f"{where}: question_id: expected an id from {questions}, got {qid!r}")
        pairs.append((qid, row["content"].strip()))
    return qs, pairs


def cmedqa_records(questions: str, answers: str, per_question: int = 1) -> tuple[list[dict], dict[str, int]]:
    """Medical instruction records from cMedQA2 CSVs; at most ``per_question`` answers per question (0: all).

    Returns:
        The records (in question-file order, answers in answer-file order) and counts
        (``questions``, ``answers``, ``unanswered``, ``records``).
    """
    qs, pairs = _cmedqa_answers(questions, answers)
    by_q: dict[str, list[str]] = {}
    for qid, answer in pairs:
        by_q.setdefault(qid, []).append(answer)
    records = []
    for qid, question in qs.items():
        picked = by_q.get(qid, [])
        for answer in picked[:per_question] if per_question > 0 else picked:
            records.append({"instruction": MEDICAL_PROMPT, "input": question, "output": answer})
    stats = {
        "questions": len(qs),
        "answers": len(pairs),
        "unanswered": len(qs) - len(by_q),
        "records": len(records),
    }
    return records, stats


def numbered_reply(answers: list[str]) -> str:
    """Several doctors' answers as one reply: ``1.{a1}\\n2.{a2}\\n`` (each line ends with a newline)."""
    return "".join(f"{i}.{answer}\n" for i, answer in enumerate(answers, 1))


def cmedqa_paper_records(
    questions: str, answers: str, max_answers: int = 0
) -> tuple[list[dict], dict[str, int]]:
    """cMedQA2 as Chinese-Vicuna's medical model saw it: one record per distinct question text.

    ``{"instruction": MEDICAL_PROMPT, "input": "病人：" + question, "output": numbered_reply(answers)}``.
    Questions whose text is identical are merged (the paper merged repeated questions), their answers
    pooled in answer-file order; ``max_answers`` caps the numbered answers per record (0: all).

    Returns:
        The records (in question-file order of each text's first occurrence) and counts
        (``questions``, ``answers``, ``unanswered``, ``merged``, ``records``).
    """
    qs, pairs = _cmedqa_answers(questions, answers)
    # keyed by text in question-file order; answers appended in answer-file order, as the paper's script did
    pooled: dict[str, list[str]] = {text: [] for text in qs.values()}
    for qid, answer in pairs:
        pooled[qs[qid]].append(answer)
    records = []
    for text, answers_ in pooled.items():
        picked = answers_[:max_answers] if max_answers > 0 else answers_
        if picked:
            records.append(
                {"instruction": MEDICAL_PROMPT, "input": PATIENT_PREFIX + text, "output": numbered_reply(picked)}
            )
    stats = {
        "questions": len(qs),
        "answers": len(pairs),
        "unanswered": len(qs) - len({qid for qid, _ in pairs}),
        "merged": len(qs) - len(pooled),
        "records": len(records),
    }
    return records, stats


def _lawyer_record(where: str, r: Any) -> dict:
    if not isinstance(r, dict):
        raise DataError(f"{where}: record: expected a JSON object, got {type(r).__name__}")
    if "question" in r or "answer" in r:
        question, answer = text_field(where, r, "question"), text_field(where, r, "answer")
    elif "output" in r:
        answer = text_field(where, r, "output")
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
    return {"instruction": LEGAL_PROMPT, "input": question, "output": answer}


def lawyer_records(path: str, on_bad_record: str = "error", skipped: list[str] | None = None) -> list[dict]:
    """Legal instruction records from Lawyer-LLaMA style JSON or JSONL.

    ``question``/``answer`` is used when present; otherwise ``output`` is the answer and the question is
    ``instruction`` and ``input`` joined by a newline (either may be missing or empty).

    Args:
        path: A JSON array or JSONL file.
        on_bad_record: ``error`` stops at the first bad record; ``skip`` leaves bad records out.
        skipped: When given, the error message of every skipped record is appended to it.
    """
    return collect_records(iter_records(path), _lawyer_record, on_bad_record, path, skipped)


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, p)


def as_chat(record: dict) -> dict:
    """An instruction record as a one-turn Chinese-Vicuna chat record ``{"input": [q], "output": [a]}``.

    The legal Q&A prompt is dropped, the user turn being the question alone as in the paper's legal
    chat data; any other instruction (CAIL's task) stays in front of the input, joined by a newline.
    """
    user = record["input"] if record["instruction"] == LEGAL_PROMPT else f"{record['instruction']}\n{record['input']}"
    return {"input": [user], "output": [record["output"]]}
