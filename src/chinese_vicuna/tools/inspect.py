"""``chinese-vicuna data inspect``: a rendered sample with trained tokens highlighted, and statistics."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..data.datasets import load_conversations, parse_source
from ..data.templates import get_template
from ..data.tokenize import IGNORE, Renderer


def highlight(tokenizer, input_ids: list[int], labels: list[int]) -> Text:
    """Prompt text dim, trained text bold green; contiguous runs decoded together (UTF-8 safe)."""
    out = Text()
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            piece = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            out.append(piece, style="bold green" if labels[start] != IGNORE else "dim")
            start = i
    return out


def inspect_data(
    paths: list[str],
    tokenizer,
    *,
    template: str = "alpaca",
    fmt: str = "auto",
    cutoff_len: int = 256,
    mask: str = "assistant",
    show: int = 1,
    system_prompt: str | None = None,
    console: Console | None = None,
) -> dict:
    """Render records like training does; print samples and statistics; return the statistics."""
    console = console or Console()
    loaded = load_conversations([parse_source(p, fmt) for p in paths], on_bad_record="error", dedup=False)
    renderer = Renderer(tokenizer, get_template(template, tokenizer, system_prompt), cutoff_len, mask)
    convs = [c for c in loaded.conversations if c.messages[0].role != "text"]
    texts = [c for c in loaded.conversations if c.messages[0].role == "text"]
    lengths, trained, chars, truncated, dropped = [], [], 0, 0, 0
    shown = 0
    for conv in convs:
        s = renderer.render(conv)
        chars += sum(len(m.content) + len(m.context) for m in conv.messages)
        if s is None:
            dropped += 1
            continue
        truncated += s.truncated
        lengths.append(len(s.input_ids))
        trained.append(s.trained)
        if shown < show:
            console.rule(f"{conv.source}  ({len(s.input_ids)} tokens, {s.trained} trained)")
            console.print(highlight(tokenizer, s.input_ids, s.labels))
            shown += 1
    for conv in texts:
        ids = renderer.text_ids(conv.messages[0].content)
        chars += len(conv.messages[0].content)
        lengths.append(len(ids))
        trained.append(len(ids))
    n = len(lengths)
    stats = {
        "records": len(loaded.conversations),
        "tokens_min": min(lengths, default=0),
        "tokens_mean": round(sum(lengths) / n, 1) if n else 0.0,
        "tokens_max": max(lengths, default=0),
        "trained_tokens_mean": round(sum(trained) / n, 1) if n else 0.0,
        "tokens_per_char": round(sum(lengths) / chars, 3) if chars else 0.0,
        "truncated": truncated,
        "dropped": dropped,
        "over_cutoff": sum(1 for x in lengths if x > cutoff_len),
    }
    table = Table(title=f"{', '.join(paths)} — template {template}, cutoff {cutoff_len}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for k, v in stats.items():
        table.add_row(k, str(v))
    console.print(table)
    console.print("[dim]dim = prompt (label -100)[/dim]   [bold green]green = trained[/bold green]")
    return stats
