"""Side-by-side generations: the same prompts through the bare base model and adapters."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..data.datasets import DataError, iter_records
from ..data.templates import get_template
from ..data.tokenize import Renderer
from ..generation.decode import GenArgs, generate_batch, instruction_conversation
from ..model.adapters import parse_adapter_specs, read_meta


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
    from ..model.adapters import load_adapters
    from ..model.load import load_model_and_tokenizer

    gen = gen or GenArgs()
    named = parse_adapter_specs(adapter_specs)
    meta = read_meta(named[0][1]) if named else {}
    model, tok = load_model_and_tokenizer(base_model or meta.get("base_model"))
    name = template or meta.get("template", "alpaca")
    renderer = Renderer(tok, get_template(name, tok, meta.get("system_prompt")), cutoff_len=4096)
    convs = [instruction_conversation(i, c) for i, c in prompts]
    columns: dict[str, list[str]] = {}
    peft_model = load_adapters(model, named) if named else model
    for col in ["base", *[n for n, _ in named]]:
        answers = []
        for conv in tqdm(convs, desc=f"generating ({col})", leave=False):
            if col == "base" and named:
                with peft_model.disable_adapter():
                    answers += generate_batch(peft_model, renderer, [conv], gen)
            else:
                if named:
                    peft_model.set_adapter(col)
                answers += generate_batch(peft_model, renderer, [conv], gen)
        columns[col] = answers
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
