"""Side-by-side generations: the same prompts through the bare base model and adapters.

With reference answers (``--reference``: JSON/JSONL records with the prompts' ``instruction`` and
``input`` and a reference answer in ``reference`` or ``output``), each column also gets the mean
character-level F1 and ROUGE-L of its answers against the references
(:mod:`chinese_vicuna.eval.metrics`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..data.datasets import DataError, iter_records
from ..generation.decode import GenArgs, generate_batch, instruction_conversation


def read_references(path: str, prompts: list[tuple[str, str]]) -> list[str]:
    """The reference answer of every prompt, matched on ``(instruction, input)``.

    Raises:
        DataError: ``file:line: field: expected ...`` for a bad record, or a prompt without a reference.
    """
    refs: dict[tuple[str, str], str] = {}
    for where, r in iter_records(path):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise DataError(f"{where}: instruction: expected a string")
        key = "reference" if "reference" in r else "output"
        if not isinstance(r.get(key), str):
            raise DataError(f"{where}: reference: expected a string in 'reference' or 'output'")
        refs.setdefault((r["instruction"], r.get("input") or ""), r[key])
    missing = [k for k, p in enumerate(prompts) if p not in refs]
    if missing:
        ins = prompts[missing[0]][0]
        raise DataError(
            f"{path}: no reference for {len(missing)} prompt(s), the first: prompt {missing[0] + 1} ({ins[:30]!r})"
        )
    return [refs[p] for p in prompts]


def reference_scores(columns: dict[str, list[str]], references: list[str]) -> dict[str, dict[str, float]]:
    """``{column: {"char_f1": mean, "rouge_l": mean}}`` against the references."""
    from .metrics import corpus_scores

    return {name: corpus_scores(answers, references) for name, answers in columns.items()}


def print_scores(scores: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="against the reference answers (character based)")
    for col, justify in (("model", "left"), ("char F1", "right"), ("ROUGE-L", "right")):
        table.add_column(col, justify=justify)
    for name, s in scores.items():
        table.add_row(name, f"{s['char_f1']:.3f}", f"{s['rouge_l']:.3f}")
    Console(width=100).print(table)


def compare(
    prompts: list[tuple[str, str]],
    adapter_specs: list[str],
    base_model: str | None = None,
    gen: GenArgs | None = None,
    template: str | None = None,
) -> dict[str, list[str]]:
    """Answers per column: ``base`` (no adapter) and one column per adapter, same decoding."""
    from ..generation.engine import Engine

    gen = gen or GenArgs()
    # the adapter's saved template unless overridden; alpaca for a bare base, as training defaults to
    engine = Engine.load(base_model, adapter_specs, template=template or (None if adapter_specs else "alpaca"))
    renderer = engine.renderer()
    convs = [instruction_conversation(i, c) for i, c in prompts]
    columns: dict[str, list[str]] = {}
    for col in ["base", *engine.adapters]:
        engine.select(None if col == "base" else col)
        columns[col] = [
            answer
            for conv in tqdm(convs, desc=f"generating ({col})", leave=False)
            for answer in generate_batch(engine.model, renderer, [conv], gen)
        ]
    return columns


def to_markdown(prompts: list[tuple[str, str]], columns: dict[str, list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", "<br>")

    head = "| prompt | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    rows = []
    for k, (ins, ctx) in enumerate(prompts):
        prompt = ins + (f"<br>{ctx}" if ctx else "")
        rows.append("| " + cell(prompt) + " | " + " | ".join(cell(c[k]) for c in columns.values()) + " |")
    return head + "\n".join(rows) + "\n"


def print_side_by_side(prompts: list[tuple[str, str]], columns: dict[str, list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True, title="same prompts, same greedy decoding")
    table.add_column("prompt", ratio=1, overflow="fold")
    for name in columns:
        table.add_column(name, ratio=2, overflow="fold")
    for k, (ins, ctx) in enumerate(prompts):
        table.add_row(ins + (f"\n{ctx}" if ctx else ""), *[c[k] for c in columns.values()])
    Console(width=160).print(table)


def write_results(path: str, prompts, columns, references: list[str] | None = None,
                  scores: dict | None = None) -> None:  # fmt: skip
    """A ``.md`` table (+ scores), or ``.json`` rows (+ ``reference``) or, with scores, ``{rows, scores}``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    if p.suffix == ".json":
        rows = [{"instruction": i, "input": c, **{k: v[n] for k, v in columns.items()}} for n, (i, c) in enumerate(prompts)]
        for row, ref in zip(rows, references or [], strict=False):
            row["reference"] = ref
        obj = {"rows": rows, "scores": scores} if scores else rows
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    else:
        md = to_markdown(prompts, columns)
        if scores:
            md += "\n| model | char F1 | ROUGE-L |\n|---|---|---|\n" + "".join(
                f"| {k} | {s['char_f1']:.3f} | {s['rouge_l']:.3f} |\n" for k, s in scores.items()
            )
        tmp.write_text(md, encoding="utf-8")
    tmp.replace(p)
