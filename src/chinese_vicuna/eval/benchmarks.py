"""A multiple-choice benchmark in its published layout, evaluated subject by subject.

:class:`Benchmark` says where a subject's CSV files are, which columns they have, how its prompt
reads, and which categories each subject counts towards. :func:`evaluate` runs it and returns the
results dict written as JSON: per subject (questions, correct, accuracy, predictions by question
id), per category and the average — the mean of subject accuracies, as C-Eval and CMMLU report it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.datasets import DataError
from .mcq import (
    Encoded,
    PromptEncoder,
    Question,
    argmax_letter,
    check_shots,
    generate_letters,
    read_questions,
    score_letters,
)


@dataclass(frozen=True)
class Benchmark:
    name: str  # "C-Eval", "CMMLU"
    key: str  # "ceval", "cmmlu": the results JSON's "benchmark"
    columns: dict[str, str]
    file: Callable[[Path, str, str], Path]  # (data dir, split, subject) -> CSV path
    pattern: Callable[[str], str]  # split -> glob of its subject files
    prompt: Callable[[str, Question, list[Question]], str]  # (subject, question, examples)
    categories: dict[str, tuple[str, ...]]  # subject -> its categories
    category_order: tuple[str, ...]
    splits: tuple[str, ...] = ("dev", "val", "test")
    unanswered: str | None = "test"  # the split published without answers (C-Eval's test)

    def subject_of(self, path: Path, split: str) -> str:
        head, tail = self.pattern(split).split("*")
        return path.name[len(head) : len(path.name) - len(tail)]

    def discover(self, data: Path, split: str) -> list[str]:
        folder = data / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (expected the {self.name} layout: {self.layout})")
        subjects = sorted(self.subject_of(f, split) for f in folder.glob(self.pattern(split)))
        if not subjects:
            raise DataError(f"{folder}: no {self.pattern(split)} files")
        return subjects

    @property
    def layout(self) -> str:
        return f"DIR/{{{','.join(self.splits)}}}/{self.pattern('<split>').replace('*', '<subject>')}"

    def read(self, data: Path, split: str, subject: str) -> list[Question]:
        need_answer = split != self.unanswered
        return read_questions(self.file(data, split, subject), self.columns, need_answer, self.name)

    def examples(self, data: Path, subject: str, shots: int) -> list[Question]:
        """The first ``shots`` solved dev examples of a subject."""
        if not shots:
            return []
        path = self.file(data, "dev", subject)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: --shots {shots} needs the subject's dev file")
        dev = self.read(data, "dev", subject)
        if len(dev) < shots:
            raise DataError(f"{path}: --shots {shots} needs {shots} examples, found {len(dev)}")
        return dev[:shots]


def encode_subject(bench: Benchmark, encoder: PromptEncoder, subject: str, questions: list[Question],
                   examples: list[Question], letters: bool, reserve: int = 0) -> list[Encoded]:  # fmt: skip
    return [
        encoder.question(lambda k, q=q: bench.prompt(subject, q, examples[:k]), len(examples), letters, reserve)
        for q in questions
    ]


def predict(
    model,
    tokenizer,
    bench: Benchmark,
    subject: str,
    questions: list[Question],
    examples: list[Question],
    template=None,
    generate: bool = False,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    prefix_cache: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str | None], list[list[float]] | None]:
    """Predicted letters (``None``: no letter in generated text) and, from logits, their log-probs."""
    max_len = getattr(model.config, "max_position_embeddings", None) or 4096
    encoder = PromptEncoder(tokenizer, template, max_len)
    encoded = encode_subject(bench, encoder, subject, questions, examples, not generate,
                             max_new_tokens if generate else 0)  # fmt: skip
    if generate:
        stops = ("\n\n", *(template.stop_strings if template is not None else ()))
        return generate_letters(model, tokenizer, encoded, max_new_tokens, stops, progress), None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logps = score_letters(model, encoded, batch_size, prefix_cache, pad or 0, progress)
    return [argmax_letter(lp) for lp in logps], logps


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(bench: Benchmark, result: dict) -> dict:
    """Fill in ``categories``, ``average`` (mean over subjects) and ``overall`` (over questions)."""
    subjects = {k: s for k, s in result["subjects"].items() if s.get("accuracy") is not None}
    cats = {
        c: mean([s["accuracy"] for k, s in subjects.items() if c in bench.categories.get(k, ())])
        for c in bench.category_order
    }
    result["categories"] = {c: a for c, a in cats.items() if a is not None}
    result["average"] = mean([s["accuracy"] for s in subjects.values()])
    total = sum(s["total"] for s in subjects.values())
    result["overall"] = sum(s["correct"] for s in subjects.values()) / total if total else None
    return result


def evaluate(
    model,
    tokenizer,
    bench: Benchmark,
    data: str | os.PathLike,
    subjects: list[str] | None = None,
    split: str = "val",
    shots: int = 0,
    template=None,
    generate: bool = False,
    max_new_tokens: int = 16,
    limit: int | None = None,
    batch_size: int = 8,
    prefix_cache: bool = True,
    progress: bool = True,
) -> dict:
    """Per-subject, per-category and average accuracy; predictions of every question by id."""
    from tqdm.auto import tqdm

    data = Path(data)
    check_shots(shots)
    subjects = subjects or bench.discover(data, split)
    loaded = {}
    for s in subjects:  # read every file first: a bad file fails before any model time is spent
        questions = bench.read(data, split, s)
        loaded[s] = (questions[:limit] if limit else questions, bench.examples(data, s, shots))
    result: dict = {
        "benchmark": bench.key,
        "split": split,
        "shots": shots,
        "mode": "generate" if generate else "logits",
        "with_prompt": template.name if template is not None else None,
        "subjects": {},
    }
    bar = tqdm(total=sum(len(q) for q, _ in loaded.values()), desc=bench.name, unit="q", disable=not progress)
    for subject, (questions, examples) in loaded.items():
        bar.set_postfix_str(subject)
        preds, _ = predict(model, tokenizer, bench, subject, questions, examples, template, generate,
                           max_new_tokens, batch_size, prefix_cache, bar.update)  # fmt: skip
        scored = [(p, q.answer) for p, q in zip(preds, questions, strict=True) if q.answer is not None]
        correct = sum(p == a for p, a in scored)
        result["subjects"][subject] = {
            "total": len(scored),
            "correct": correct,
            "accuracy": correct / len(scored) if scored else None,
            "predictions": {q.id: p for q, p in zip(questions, preds, strict=True)},
        }
        if generate:  # answers in which no letter was found (counted wrong)
            result["subjects"][subject]["no_letter"] = sum(p is None for p in preds)
    bar.close()
    return summarise(bench, result)


def submission(result: dict) -> dict[str, dict[str, str]]:
    """C-Eval's submission file: ``{subject: {question id: letter}}`` (``""``: no letter found)."""
    return {s: {qid: p or "" for qid, p in r["predictions"].items()} for s, r in result["subjects"].items()}


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, p)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def print_table(bench: Benchmark, result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    wrap = f", with {result['with_prompt']} prompt" if result.get("with_prompt") else ""
    title = f"{bench.name} {result['split']}, {result['shots']}-shot, {result['mode']}{wrap}"
    table = Table(title=title)
    for col, justify in (("subject", "left"), ("questions", "right"), ("correct", "right"), ("accuracy %", "right")):
        table.add_column(col, justify=justify)
    for name, s in result["subjects"].items():
        table.add_row(name, str(s["total"]), str(s["correct"]), pct(s["accuracy"]))
    for cat, acc in result["categories"].items():
        table.add_row(f"[{cat}]", "", "", pct(acc), style="italic")
    table.add_row("average", "", "", pct(result["average"]), style="bold")
    Console(width=100).print(table)


def load_result(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: results file not found")
    try:
        r = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(r, dict) or not isinstance(r.get("subjects"), dict):
        raise DataError(f"{p}: subjects: expected the results JSON of `eval ceval` or `eval cmmlu`")
    return r


def compare_table(a: dict, b: dict, names: tuple[str, str], benches: dict[str, Benchmark]) -> list[tuple]:
    """Rows ``(category, accuracy a, accuracy b)``: the categories, then the average.

    Categories are recomputed from the subjects the two results share, so both columns average
    the same subjects.
    """
    kind = a.get("benchmark", "ceval")
    if b.get("benchmark", "ceval") != kind:
        raise DataError(f"{names[1]}: benchmark: expected {kind!r} like {names[0]}, got {b.get('benchmark')!r}")
    bench = benches[kind]
    shared = [s for s in a["subjects"] if s in b["subjects"]]
    if not shared:
        raise DataError(f"{names[1]}: subjects: no subject in common with {names[0]}")
    sa = summarise(bench, {"subjects": {s: a["subjects"][s] for s in shared}})
    sb = summarise(bench, {"subjects": {s: b["subjects"][s] for s in shared}})
    rows = [(c, sa["categories"].get(c), sb["categories"].get(c)) for c in bench.category_order]
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    return rows + [(f"average ({len(shared)} subjects)", sa["average"], sb["average"])]


def print_compare(rows: list[tuple], names: tuple[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="accuracy % by category")
    table.add_column("category")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("difference", justify="right")
    for cat, x, y in rows:
        diff = "-" if x is None or y is None else f"{100 * (y - x):+.1f}"
        table.add_row(cat, pct(x), pct(y), diff)
    Console(width=120).print(table)

