"""``chinese-vicuna eval ceval`` (C-Eval multiple choice) and the ``eval ppl`` command.

C-Eval layout: ``DIR/{dev,val,test}/<subject>_<split>.csv`` with columns ``id,question,A,B,C,D,answer``.
The prompt is C-Eval's own: a header naming the subject, ``shots`` solved examples from ``dev``, then
the question ending in ``答案：``. The prediction is the letter whose token has the highest logit
at the next position (or, with ``--generate``, the first answer letter found in the generated text).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..data.datasets import DataError

CHOICES = ("A", "B", "C", "D")
COLUMNS = ("id", "question", *CHOICES, "answer")
# C-Eval's subject_mapping.json, the Chinese names used in its prompt header.
SUBJECTS_ZH = dict(
    line.split()
    for line in """
computer_network 计算机网络
operating_system 操作系统
computer_architecture 计算机组成
college_programming 大学编程
college_physics 大学物理
college_chemistry 大学化学
advanced_mathematics 高等数学
probability_and_statistics 概率统计
discrete_mathematics 离散数学
electrical_engineer 注册电气工程师
metrology_engineer 注册计量师
high_school_mathematics 高中数学
high_school_physics 高中物理
high_school_chemistry 高中化学
high_school_biology 高中生物
middle_school_mathematics 初中数学
middle_school_biology 初中生物
middle_school_physics 初中物理
middle_school_chemistry 初中化学
veterinary_medicine 兽医学
college_economics 大学经济学
business_administration 工商管理
marxism 马克思主义基本原理
mao_zedong_thought 毛泽东思想和中国特色社会主义理论体系概论
education_science 教育学
teacher_qualification 教师资格
high_school_politics 高中政治
high_school_geography 高中地理
middle_school_politics 初中政治
middle_school_geography 初中地理
modern_chinese_history 近代史纲要
ideological_and_moral_cultivation 思想道德修养与法律基础
logic 逻辑学
law 法学
chinese_language_and_literature 中国语言文学
art_studies 艺术学
professional_tour_guide 导游资格
legal_professional 法律职业资格
high_school_chinese 高中语文
high_school_history 高中历史
middle_school_history 初中历史
civil_servant 公务员
sports_science 体育学
plant_protection 植物保护
basic_medicine 基础医学
clinical_medicine 临床医学
urban_and_rural_planner 注册城乡规划师
accountant 注册会计师
fire_engineer 注册消防工程师
environmental_impact_assessment_engineer 环境影响评价工程师
tax_accountant 税务师
physician 医师资格
""".strip().splitlines()
)


@dataclass
class Question:
    id: str
    question: str
    options: dict[str, str]
    answer: str | None  # None: unscored (the official test split has no answers)


def subject_name(subject: str) -> str:
    return SUBJECTS_ZH.get(subject, subject.replace("_", " "))


def read_csv(path: str | os.PathLike, need_answer: bool = True) -> list[Question]:
    """Questions of one C-Eval CSV file.

    Raises:
        DataError: ``file:line: column: expected ...`` for a missing column or a bad cell.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: C-Eval file not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in COLUMNS:
            if col not in header and (col != "answer" or need_answer):
                raise DataError(
                    f"{path}:1: {col}: expected a column named {col!r} (header: {','.join(header)})"
                )
        out = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            for col in ("question", *CHOICES):
                if not isinstance(row.get(col), str) or (col == "question" and not row[col].strip()):
                    raise DataError(f"{where}: {col}: expected text")
            answer = (row.get("answer") or "").strip().upper() or None
            if answer is None and need_answer:
                raise DataError(f"{where}: answer: expected one of A, B, C, D, got an empty cell")
            if answer is not None and answer not in CHOICES:
                raise DataError(f"{where}: answer: expected one of A, B, C, D, got {row['answer']!r}")
            out.append(Question(row["id"], row["question"], {c: row[c] for c in CHOICES}, answer))
    return out


def format_question(q: Question, with_answer: bool = False) -> str:
    text = q.question + "".join(f"\n{c}. {q.options[c]}" for c in CHOICES) + "\n答案："
    return text + f"{q.answer}\n\n" if with_answer else text


def build_prompt(subject: str, q: Question, examples: list[Question]) -> str:
    """C-Eval's prompt: header, solved examples, then the question ending in ``答案：``."""
    head = f"以下是中国关于{subject_name(subject)}考试的单项选择题，请选出其中的正确答案。\n\n"
    return head + "".join(format_question(e, True) for e in examples) + format_question(q)


def letter_ids(tokenizer) -> list[int]:
    """Token id of each answer letter as it follows ``答案：`` (no word-start marker)."""
    ids = []
    for c in CHOICES:
        after = tokenizer("：" + c, add_special_tokens=False)["input_ids"]
        if not after or tokenizer.decode(after[-1:]).strip() != c:
            raise ConfigError(f"the tokenizer has no single token for the answer letter {c!r}")
        ids.append(after[-1])
    return ids


def parse_answer(text: str) -> str | None:
    """The answer letter in generated text: ``答案是B``, ``B. ...``, or the first lone A-D."""
    for pattern in (
        r"答案\s*(?:是|为)?\s*[:：]?\s*([ABCD])",
        r"^\s*([ABCD])(?![A-Za-z])",
        r"(?<![A-Za-z])([ABCD])(?![A-Za-z])",
    ):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def _prompt_ids(tokenizer, subject: str, q: Question, examples: list[Question], max_len: int) -> list[int]:
    # Too long for the context: drop examples from the end, as C-Eval's own code does.
    for k in range(len(examples), -1, -1):
        ids = tokenizer(build_prompt(subject, q, examples[:k]))["input_ids"]
        if len(ids) <= max_len or k == 0:
            return ids[-max_len:]
    raise AssertionError("unreachable")


def predict(
    model,
    tokenizer,
    subject: str,
    questions: list[Question],
    examples: list[Question],
    generate: bool = False,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> list[str | None]:
    """The predicted letter of every question (``None``: no letter found in generated text)."""
    import torch
    from tqdm.auto import tqdm

    max_len = getattr(model.config, "max_position_embeddings", None) or 4096
    choice_ids = None if generate else letter_ids(tokenizer)
    device = getattr(model, "device", "cpu")
    preds: list[str | None] = []
    for q in tqdm(questions, desc=subject, disable=not progress, leave=False):
        ids = _prompt_ids(tokenizer, subject, q, examples, max_len - (max_new_tokens if generate else 0))
        if generate:
            from ..generation.decode import GenArgs, TextStream

            gen = GenArgs(max_new_tokens=max_new_tokens, repetition_penalty=1.0)
            preds.append(parse_answer(TextStream(model, tokenizer, ids, gen, ("\n\n",)).run()))
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]
        preds.append(CHOICES[int(torch.argmax(logits[choice_ids].float()))])
    return preds


def check_shots(shots: int) -> None:
    if not 0 <= shots <= 5:
        raise ConfigError(f"--shots: expected 0..5 (C-Eval has 5 dev examples per subject), got {shots}")


def discover_subjects(data: Path, split: str) -> list[str]:
    folder = data / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such folder (expected the C-Eval layout DIR/{{dev,val,test}}/)"
        )
    subjects = sorted(f.name[: -len(f"_{split}.csv")] for f in folder.glob(f"*_{split}.csv"))
    if not subjects:
        raise DataError(f"{folder}: no <subject>_{split}.csv files")
    return subjects


def evaluate(
    model,
    tokenizer,
    data: str | os.PathLike,
    subjects: list[str] | None = None,
    split: str = "val",
    shots: int = 0,
    generate: bool = False,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> dict:
    """Per-subject and average accuracy (the average is over subjects, as C-Eval reports it)."""
    data = Path(data)
    subjects = subjects or discover_subjects(data, split)
    check_shots(shots)
    result: dict = {
        "split": split,
        "shots": shots,
        "mode": "generate" if generate else "logits",
        "subjects": {},
    }
    for subject in subjects:
        questions = read_csv(data / split / f"{subject}_{split}.csv", need_answer=split != "test")
        examples: list[Question] = []
        if shots:
            examples = read_csv(data / "dev" / f"{subject}_dev.csv")
            if len(examples) < shots:
                dev = data / "dev" / f"{subject}_dev.csv"
                raise DataError(f"{dev}: --shots {shots} needs {shots} examples, found {len(examples)}")
            examples = examples[:shots]
        preds = predict(model, tokenizer, subject, questions, examples, generate, max_new_tokens, progress)
        scored = [(p, q.answer) for p, q in zip(preds, questions, strict=True) if q.answer is not None]
        correct = sum(p == a for p, a in scored)
        result["subjects"][subject] = {
            "total": len(scored),
            "correct": correct,
            "accuracy": correct / len(scored) if scored else None,
            "predictions": {q.id: p for q, p in zip(questions, preds, strict=True)},
        }
    accs = [s["accuracy"] for s in result["subjects"].values() if s["accuracy"] is not None]
    result["average"] = sum(accs) / len(accs) if accs else None
    total = sum(s["total"] for s in result["subjects"].values())
    result["overall"] = sum(s["correct"] for s in result["subjects"].values()) / total if total else None
    return result


def write_json(path: str | os.PathLike, obj: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, p)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    table = Table(title=f"C-Eval {result['split']}, {result['shots']}-shot, {result['mode']}")
    for col, justify in (
        ("subject", "left"),
        ("questions", "right"),
        ("correct", "right"),
        ("accuracy %", "right"),
    ):
        table.add_column(col, justify=justify)
    for name, s in result["subjects"].items():
        table.add_row(name, str(s["total"]), str(s["correct"]), pct(s["accuracy"]))
    table.add_row("average", "", "", pct(result["average"]), style="bold")
    Console().print(table)


def cmd_ceval(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.adapters import load_for_inference

    check_shots(args.shots)
    data = Path(args.data)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    subjects = subjects or discover_subjects(data, args.split)
    for s in subjects:  # check every file before loading a model
        read_csv(data / args.split / f"{s}_{args.split}.csv", need_answer=args.split != "test")
        if args.shots:
            read_csv(data / "dev" / f"{s}_dev.csv")
    model, tok, _ = load_for_inference(args.model, args.adapter or [])
    result = evaluate(model, tok, data, subjects, args.split, args.shots, args.generate, args.max_new_tokens)
    result.update(model=args.model, adapters=args.adapter or [])
    print_table(result)
    if args.output:
        write_json(args.output, result)
        print(f"written to {args.output}")
    return 0


def cmd_ppl(args: argparse.Namespace, extra: list[str]) -> int:
    from ..model.adapters import load_for_inference
    from ..model.vocab import read_texts
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


def register(subparsers, groups) -> None:
    """Add ``eval ceval`` and ``eval ppl``."""
    q = groups["eval"].add_parser("ceval", help="C-Eval multiple-choice accuracy (zero/few-shot)")
    q.add_argument("--data", required=True, help="C-Eval folder: {dev,val,test}/<subject>_<split>.csv")
    q.add_argument(
        "--model", default=None, help="base model (default: the adapter's base, else embedded SmolLM2)"
    )
    q.add_argument("--adapter", action="append", help="adapter folder; repeatable (the first is active)")
    q.add_argument(
        "--subjects", default=None, help="comma-separated subjects (default: every file of the split)"
    )
    q.add_argument("--shots", type=int, default=0, help="solved dev examples before each question (0..5)")
    q.add_argument("--split", default="val", choices=["dev", "val", "test"])
    q.add_argument(
        "--generate", action="store_true", help="parse the letter from generated text instead of logits"
    )
    q.add_argument("--max-new-tokens", type=int, default=16, help="with --generate")
    q.add_argument("--output", default=None, help="results JSON (written atomically)")
    q.set_defaults(func=cmd_ceval)

    q = groups["eval"].add_parser("ppl", help="perplexity with the sliding-window method")
    q.add_argument("--data", required=True, help=".txt or JSON/JSONL (text fields), scored as one stream")
    q.add_argument("--model", default=None)
    q.add_argument("--adapter", action="append", help="adapter folder; repeatable (the first is active)")
    q.add_argument("--window", type=int, default=512, help="tokens per forward pass")
    q.add_argument(
        "--stride", type=int, default=256, help="window step; only the last STRIDE tokens are scored"
    )
    q.add_argument("--output", default=None, help="results JSON (written atomically)")
    q.set_defaults(func=cmd_ppl)
