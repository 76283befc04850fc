"""Load, validate, mix, deduplicate, split and tokenize training data.

Sources: JSON (array), JSONL, parquet, ``.txt`` (raw text, one document per blank-line separated
paragraph), a local ``datasets`` folder, or a hub id. Every bad record is reported as
``file:line: field: what was expected``; with ``on_bad_record: skip`` the rejects are counted and
written to ``rejects.jsonl`` instead.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .formats import Conversation, RecordError, to_conversation
from .tokenize import IGNORE, Renderer, Sample


class DataError(ValueError):
    """Bad data the user must fix; the message starts with ``file:line``."""


@dataclass
class Source:
    path: str
    weight: float = 1.0
    format: str = "auto"


def parse_source(spec: str | dict, default_format: str = "auto") -> Source:
    """``PATH``, ``PATH*WEIGHT`` or a YAML mapping ``{path, weight, format}``."""
    if isinstance(spec, dict):
        return Source(str(spec["path"]), float(spec.get("weight", 1.0)), spec.get("format", default_format))
    m = re.fullmatch(r"(.+)\*([0-9]*\.?[0-9]+)", spec)
    if m:
        return Source(m.group(1), float(m.group(2)), default_format)
    return Source(spec, 1.0, default_format)


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped); a ``DataError`` naming the line of a bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); expected UTF-8 text") from None


def json_array(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Iterate a JSON array element by element, tracking each element's line number.

    A JSON object with a ``data`` list (a common export shape) is accepted too.
    """
    body = text.lstrip()
    if not body.startswith("["):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            yield from ((f"{path}:item {k}", r) for k, r in enumerate(obj["data"]))
            return
        raise DataError(f"{path}:1: expected a JSON array of records (or JSONL, one record per line)")
    dec = json.JSONDecoder()
    pos = len(text) - len(body) + 1
    line, counted = 1, 0  # lines are counted incrementally: large files stay linear
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{text.count(chr(10)) + 1}: invalid JSON: the array is not closed with ']'")
        line += text.count("\n", counted, pos)
        counted = pos
        if text[pos] == "]":
            if text[pos + 1 :].strip():
                raise DataError(f"{path}:{line}: invalid JSON: extra data after the array")
            return
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        yield f"{path}:{line}", obj


_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt", ".csv")


def iter_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` from one source, raising DataError for unreadable input."""
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
            yield from ((f"{p}:row {i + 1}", r) for i, r in enumerate(ds))
            return
        files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl", ".parquet", ".txt"))
        if not files:
            raise DataError(f"{p}: no .json/.jsonl/.parquet/.txt files in this folder")
        for f in files:
            yield from iter_records(str(f))
        return
    if not p.exists():
        looks_like_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and p.suffix not in _SUFFIXES
        if not looks_like_hub_id:
            raise DataError(f"{p}: file not found")
        yield from _hub_records(path)
        return
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, r in enumerate(pq.read_table(p).to_pylist()):
            yield f"{p}:row {i + 1}", r
        return
    text = read_text(p)
    if not text.strip():
        raise DataError(f"{p}:1: empty file; expected records")
    if p.suffix == ".txt":
        line = 1
        for block in re.split(r"(\n\s*\n)", text):
            if block.strip() and not re.fullmatch(r"\n\s*\n", block):
                yield f"{p}:{line + (len(block) - len(block.lstrip(chr(10))))}", {"text": block.strip()}
            line += block.count("\n")
        return
    if p.suffix == ".json" or text.lstrip().startswith("["):
        yield from json_array(p, text)
        return
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            yield f"{p}:{n}", json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: invalid JSON (column {e.colno}): {e.msg}") from None


def text_field(where: str, record: dict, key: str) -> str:
    """``record[key]`` stripped; a ``DataError`` unless it is a non-empty string."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else type(value).__name__
        raise DataError(f"{where}: {key}: expected a non-empty string, got {got}")
    return value.strip()


def collect_records(
    items: Iterator[tuple[str, Any]], convert: Callable[[str, Any], dict], on_bad_record: str, path: str,
    skipped: list[str] | None,
) -> list[dict]:
    """Convert every record; with ``on_bad_record="skip"`` bad ones are left out and their errors appended
    to ``skipped``. A source that yields no record at all is an error."""
    records, bad = [], []
    for where, r in tqdm(items, desc=Path(path).name, unit=" records", leave=False):
        try:
            records.append(convert(where, r))
        except DataError as e:
            if on_bad_record != "skip":
                raise
            bad.append(str(e))
    if skipped is not None:
        skipped.extend(bad)
    if not records:
        raise DataError(f"{path}: no records found" + (f" ({len(bad)} bad records skipped)" if bad else ""))
    return records


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


def _hub_records(name: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # the hub raises many types; all mean "could not get it"
        raise DataError(
            f"{name}: not a local file or folder, and loading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline? Pass a local path."
        ) from None
    yield from ((f"{name}:row {i + 1}", r) for i, r in enumerate(ds))


@dataclass
class LoadResult:
    conversations: list[Conversation]
    rejects: list[dict] = field(default_factory=list)
    duplicates: int = 0


def read_sources(
    sources: list[Source],
    convert: Callable[[Any, str, Source], list],
    key: Callable[[Any], tuple],
    on_bad_record: str = "error",
    dedup: bool = True,
    seed: int = 42,
) -> tuple[list, list[dict], int]:
    """Read every source, ``convert(record, where, source)`` each record to items, drop duplicate items
    (by ``key``), apply the sources' weights (seeded). Returns ``(items, rejects, duplicates)``.

    A RecordError stops with ``file:line`` (``on_bad_record: error``) or is collected as a reject.
    """
    if not sources:
        raise DataError("no data: set data_path (a file, folder or hub id)")
    seen: set = set()
    out: list = []
    rejects: list[dict] = []
    duplicates = 0
    rng = random.Random(seed)
    for src in sources:
        items: list = []
        for where, record in iter_records(src.path):
            try:
                converted = convert(record, where, src)
            except RecordError as e:
                if on_bad_record == "error":
                    raise DataError(str(e)) from None
                rejects.append({"where": where, "error": str(e), "record": record})
                continue
            for item in converted:
                if dedup:
                    k = key(item)
                    if k in seen:
                        duplicates += 1
                        continue
                    seen.add(k)
                items.append(item)
        if not items and not rejects:
            raise DataError(f"{src.path}: no records found")
        whole, frac = int(src.weight), src.weight - int(src.weight)
        picked = items * whole
        if frac:
            picked += rng.sample(items, round(len(items) * frac))
        out += picked
    return out, rejects, duplicates


def report_rejects(rejects: list[dict], rejects_path: str | None) -> None:
    """Write skipped records to ``rejects_path`` (JSONL) and say how many there were."""
    if not rejects:
        return
    if rejects_path:
        Path(rejects_path).parent.mkdir(parents=True, exist_ok=True)
        with open(rejects_path, "w", encoding="utf-8") as f:
            for r in rejects:
                f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    print(f"skipped {len(rejects)} bad records" + (f" (written to {rejects_path})" if rejects_path else ""))


def load_conversations(
    sources: list[Source], on_bad_record: str = "error", dedup: bool = True, seed: int = 42
) -> LoadResult:
    """Read every source, convert records, drop duplicates, apply weights (seeded)."""
    convs, rejects, duplicates = read_sources(
        sources, lambda r, where, src: [to_conversation(r, src.format, where)], Conversation.key, on_bad_record, dedup, seed
    )
    return LoadResult(convs, rejects, duplicates)


def split(items: list, val_size: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then take ``val_size`` items (a count >= 1 or a fraction < 1) for validation."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = int(val_size) if val_size >= 1 else round(len(items) * val_size)
    if val_size and n_val >= len(items):
        raise DataError(f"val_size ({val_size:g}) must leave training data: there are only {len(items)} samples")
    if val_size and n_val == 0:
        n_val = 1
    return items[n_val:], items[:n_val]


def group_text_blocks(docs: list[list[int]], block_size: int) -> list[Sample]:
    """Concatenate pre-training documents and cut them into full blocks (the run_clm recipe)."""
    flat = [t for d in docs for t in d]
    n = max(len(flat) // block_size, 1 if flat else 0)
    blocks = [flat[i * block_size : (i + 1) * block_size] for i in range(n)]
    return [Sample(b, list(b)) for b in blocks if len(b) > 1]


@dataclass
class PreparedData:
    train: list[Sample]
    val: list[Sample]
    stats: dict[str, Any]


def prepare(
    renderer: Renderer,
    sources: list[Source],
    *,
    val_size: float = 0.0,
    seed: int = 42,
    dedup: bool = True,
    on_bad_record: str = "error",
    max_samples: int | None = None,
    rejects_path: str | None = None,
    progress: bool = True,
) -> PreparedData:
    """From data sources to tokenized train/validation samples, with statistics."""
    loaded = load_conversations(sources, on_bad_record, dedup, seed)
    report_rejects(loaded.rejects, rejects_path)
    texts = [c for c in loaded.conversations if c.messages and c.messages[0].role == "text"]
    convs = [c for c in loaded.conversations if not (c.messages and c.messages[0].role == "text")]
    samples: list[Sample] = []
    dropped = truncated = 0
    for conv in tqdm(convs, desc="tokenizing", disable=not progress or not convs, leave=False):
        s = renderer.render(conv)
        if s is None:
            dropped += 1
            continue
        truncated += s.truncated
        if s.trained:
            samples.append(s)
    if texts:
        docs = [renderer.text_ids(c.messages[0].content) for c in texts]
        samples += group_text_blocks(docs, renderer.cutoff_len)
    if not samples:
        raise DataError("no trainable samples left after tokenization (all dropped or empty)")
    train, val = split(samples, val_size, seed)
    if max_samples:
        train = train[:max_samples]
    lengths = [len(s.input_ids) for s in train]
    stats = {
        "records": len(loaded.conversations),
        "duplicates_removed": loaded.duplicates,
        "rejected": len(loaded.rejects),
        "truncated": truncated,
        "dropped_overlong": dropped,
        "train_samples": len(train),
        "val_samples": len(val),
        "train_tokens": sum(lengths),
        "trained_tokens": sum(sum(1 for x in s.labels if x != IGNORE) for s in train),
        "max_len": max(lengths, default=0),
        "mean_len": (sum(lengths) / len(lengths)) if lengths else 0.0,
    }
    return PreparedData(train, val, stats)
