"""Raw CAIL2018 criminal cases -> legal instruction records (``chinese-vicuna data convert cail``).

A case is ``{"fact": ..., "meta": {"accusation": [...], "relevant_articles": [...],
"term_of_imprisonment": {"death_penalty", "life_imprisonment", "imprisonment"}, "punish_of_money"}}``;
it becomes ``{"instruction": CAIL_PROMPT, "input": fact, "output": cail_verdict(meta)}``. Every
problem is reported as ``file:line: field: expected ...``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .datasets import DataError, collect_records, json_array, read_text, text_field

CAIL_PROMPT = "根据下面的案件事实，给出罪名、相关法条和刑期。"


def _cail_items(path: str) -> Iterator[tuple[str, Any]]:
    """Records of a CAIL file or folder: CAIL ships JSON Lines under a ``.json`` name, so read by line.

    JSON Lines are streamed (CAIL2018's largest file is over a million cases); a JSON array is read whole.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl"))
        if not files:
            raise DataError(f"{p}: no .json/.jsonl files in this folder")
        for f in files:
            yield from _cail_items(str(f))
        return
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    with open(p, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="ignore").lstrip()
    if head.startswith("["):
        yield from json_array(p, read_text(p))
        return
    seen = False
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{n}: not valid UTF-8 (byte {e.start} of the line); expected UTF-8 text") from None
            if not line.strip():
                continue
            seen = True
            try:
                yield f"{p}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                # a bad line is a bad record: `--on-bad-record skip` can leave it out
                yield f"{p}:{n}", DataError(f"{p}:{n}: record: expected a JSON object (invalid JSON: {e.msg})")
    if not seen:
        raise DataError(f"{p}:1: empty file; expected records")


def _got(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str | int | float | bool) else type(value).__name__


def _bool(where: str, obj: dict, key: str, field: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise DataError(f"{where}: {field}: expected true or false, got {_got(value)}")
    return value


def _count(where: str, obj: dict, key: str, field: str, what: str, required: bool = True) -> int:
    value = obj.get(key, None if required else 0)
    # bool is an int subclass in Python, but `true` months is a data error
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: {field}: expected {what} (an integer >= 0), got {_got(value)}")
    return value


def _names(where: str, meta: dict, key: str) -> list:
    value = meta.get(key)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: meta.{key}: expected a non-empty list, got {_got(value)}")
    return value


def charge_name(accusation: str) -> str:
    """CAIL's accusation label as a charge: ``盗窃`` -> ``盗窃罪``, ``[生产、销售]假药`` -> ``生产、销售假药罪``."""
    name = accusation.strip().replace("[", "").replace("]", "")
    return name if name.endswith("罪") else name + "罪"


def cail_verdict(meta: dict, where: str = "meta") -> str:
    """The output sentence for one CAIL ``meta`` object.

    ``罪名：{charges}。相关法条：第{n}条[、第{m}条]。刑期：{term}。[罚金：{yuan}元。]`` where the term
    is ``死刑``, ``无期徒刑``, ``{months}个月`` or ``无`` (0 months), and the fine appears only when
    ``punish_of_money`` is above zero.
    """
    if not isinstance(meta, dict):
        raise DataError(f"{where}: meta: expected a JSON object, got {_got(meta)}")
    charges = []
    for i, a in enumerate(_names(where, meta, "accusation")):
        if not isinstance(a, str) or not a.strip():
            raise DataError(f"{where}: meta.accusation[{i}]: expected a non-empty string, got {_got(a)}")
        charges.append(charge_name(a))
    articles = []
    for i, n in enumerate(_names(where, meta, "relevant_articles")):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise DataError(
                f"{where}: meta.relevant_articles[{i}]: expected an article number (an integer > 0), got {_got(n)}"
            )
        articles.append(f"第{n}条")
    term = meta.get("term_of_imprisonment")
    f = "meta.term_of_imprisonment"
    if not isinstance(term, dict):
        raise DataError(f"{where}: {f}: expected a JSON object, got {_got(term)}")
    months = _count(where, term, "imprisonment", f"{f}.imprisonment", "a whole number of months")
    if _bool(where, term, "death_penalty", f"{f}.death_penalty"):
        sentence = "死刑"
    elif _bool(where, term, "life_imprisonment", f"{f}.life_imprisonment"):
        sentence = "无期徒刑"
    else:
        sentence = f"{months}个月" if months else "无"
    fine = _count(where, meta, "punish_of_money", "meta.punish_of_money", "a fine in yuan", required=False)
    out = f"罪名：{'、'.join(charges)}。相关法条：{'、'.join(articles)}。刑期：{sentence}。"
    return out + (f"罚金：{fine}元。" if fine else "")


def _cail_record(where: str, r: Any) -> dict:
    if isinstance(r, DataError):
        raise r
    if not isinstance(r, dict):
        raise DataError(f"{where}: record: expected a JSON object, got {_got(r)}")
    fact = text_field(where, r, "fact")
    if "meta" not in r:
        raise DataError(f"{where}: meta: expected a JSON object, got nothing (the key is missing)")
    return {"instruction": CAIL_PROMPT, "input": fact, "output": cail_verdict(r["meta"], where)}


def cail_records(path: str, on_bad_record: str = "error", skipped: list[str] | None = None) -> list[dict]:
    """Legal instruction records from raw CAIL2018 cases (a file or a folder of them).

    Each record becomes ``{"instruction": CAIL_PROMPT, "input": fact, "output": cail_verdict(meta)}``.

    Args:
        path: A CAIL file (JSON Lines, whatever its suffix, or a JSON array) or a folder of them.
        on_bad_record: ``error`` stops at the first bad record; ``skip`` leaves bad records out.
        skipped: When given, the error message of every skipped record is appended to it.
    """
    return collect_records(_cail_items(path), _cail_record, on_bad_record, path, skipped)
