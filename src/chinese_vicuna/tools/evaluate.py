"""Side-by-side generations: the same prompts through the bare base model and adapters."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..data.datasets import DataError, iter_records
from ..generation.decode import GenArgs, generate_batch, instruction_conversation


def read_prompts(path: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(instruction, input) pairs from a JSONL/JSON file of ``{"instruction", "input"?}`` records."""
    prompts = []
    for where, r in iter_records(path):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise DataError(f"{where}: instruction: expected a string")
        ctx = r.get("input") or ""
        if not isinstance(ctx, str):
            raise DataError(f"{where}: input: expected a string")
        prompts.append((r["instruction"], ctx))
    return prompts[:limit] if limit else prompts


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


def write_results(path: str, prompts, columns) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    if p.suffix == ".json":
        rows = [{"instruction": i, "input": c, **{k: v[n] for k, v in columns.items()}} for n, (i, c) in enumerate(prompts)]
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    else:
        tmp.write_text(to_markdown(prompts, columns), encoding="utf-8")
    tmp.replace(p)
