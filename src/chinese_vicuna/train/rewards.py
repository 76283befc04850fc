"""GRPO reward functions: the built-in ones and user functions with TRL's signature.

Every reward function is called as TRL's ``GRPOTrainer`` calls it::

    f(prompts=[...], completions=[...], completion_ids=[[...], ...], **record_fields) -> list[float | None]

one entry per completion; each record field (``answer``, ...) is a list aligned with the completions.
``None`` means "not applicable" (it is left out of that function's mean and of the weighted sum, as
in TRL). We call each function once per group (the completions of one prompt), so an error names
the record it happened on.

Built-ins (``reward_funcs`` entries):

- ``format:REGEX`` — 1.0 when ``re.search(REGEX, completion, re.DOTALL)`` finds it, else 0.0.
- ``length`` / ``length:N`` — 0 up to N completion tokens, then falling linearly to -1 at
  ``max_new_tokens`` (DAPO's overlong shaping); N defaults to ``max_new_tokens // 2``.
- ``match`` — 1.0 when the completion's final answer equals the record's ``answer``, else 0.0
  (None when the record has no ``answer``). The rule, in order:

  1. Text is normalised: NFKC (full-width digits and punctuation become ASCII: ``１２．５`` -> ``12.5``),
     thousands separators dropped (``1,000``), ``3万``/``2.5亿`` multiplied out, and Chinese numerals
     converted (``一百零五`` -> 105, ``二〇二四`` -> 2024, ``三点五`` -> 3.5, ``负三`` -> -3,
     ``三分之二`` -> 2/3, ``百分之五十`` -> 50).
  2. The answer span: the content of the last ``\\boxed{...}``; else the text after the last marker
     ``答案是``/``答案为``/``答案：``/``答案:``/``Answer:``/``answer is`` (to the end of that line); else the
     whole completion.
  3. If the gold ``answer`` holds exactly one number, the predicted number is the first number in the
     span when a box or marker was found, else the last number of the completion (Arabic digits
     first; Chinese numerals only where the text has no Arabic number); fractions ``a/b`` are
     divided; a ``%`` sign is ignored. They are equal when they differ by at most 1e-6 x max(1, |gold|).
  4. Otherwise the span (or the completion's last line) and the gold are compared as text, spaces and
     trailing punctuation removed, case-insensitively.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError


class RewardError(ConfigError):
    """A reward function that cannot be imported, raises, or returns the wrong thing; names it and the record."""


# ----------------------------------------------------------------------------- numbers
_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000}
_CN_BIG = {"万": 10**4, "亿": 10**8}
_CN = "零〇一二两三四五六七八九十百千万亿"
_CN_NUMBER = re.compile(rf"(负)?([{_CN}]+)(?:点([零〇一二三四五六七八九]+))?")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")


def _cn_int(s: str) -> int:
    if not any(c in _CN_UNITS or c in _CN_BIG for c in s):  # read digit by digit: 二〇二四
        return int("".join(str(_CN_DIGITS[c]) for c in s))
    total = section = number = 0
    for c in s:
        if c in _CN_DIGITS:
            number = _CN_DIGITS[c]
        elif c in _CN_UNITS:
            section += (number or 1) * _CN_UNITS[c]
            number = 0
        else:  # 万 / 亿
            total = (total + section + number) * _CN_BIG[c] if c == "亿" else total + (section + number) * _CN_BIG[c]
            section = number = 0
    return total + section + number


def _cn_number(m: re.Match) -> str:
    value = str(_cn_int(m.group(2)))
    if m.group(3):
        value += "." + "".join(str(_CN_DIGITS[c]) for c in m.group(3))
    return ("-" if m.group(1) else "") + value


def normalise(text: str, chinese: bool = True) -> str:
    """Step 1 of the ``match`` rule: ASCII digits, no separators, Chinese numerals as numbers."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    if chinese:
        text = re.sub(rf"百分之([{_CN}]+|\d+(?:\.\d+)?)", r"\1", text)
        text = re.sub(rf"([{_CN}]+|\d+)分之([{_CN}]+|\d+)", r"\2/\1", text)
        text = _CN_NUMBER.sub(_cn_number, text)
    return re.sub(r"(\d+(?:\.\d+)?)\s*([万亿])", lambda m: _times(m.group(1), _CN_BIG[m.group(2)]), text)


def _times(number: str, factor: int) -> str:
    value = float(number) * factor
    return str(int(value)) if value.is_integer() else repr(value)


def _value(s: str) -> float:
    if "/" in s:
        a, b = s.split("/")
        return float(a) / float(b) if float(b) else math.nan
    return float(s)


def numbers(text: str) -> list[float]:
    """Every number in ``text`` after normalisation (Arabic digits first; Chinese numerals only if there are none)."""
    found = _NUMBER.findall(normalise(text, chinese=False))
    if not found:
        found = _NUMBER.findall(normalise(text))
    return [_value(x) for x in found]


_MARKERS = re.compile(r"(?:答案\s*(?:是|为|：|:)|answer\s*(?:is|:))", re.IGNORECASE)


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]


def answer_span(text: str) -> tuple[str, bool]:
    """Step 2: (the span holding the final answer, whether a box or marker delimited it)."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed, True
    marks = list(_MARKERS.finditer(text))
    if marks:
        return text[marks[-1].end() :].strip().split("\n")[0], True
    return text, False


def _plain(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).strip().strip("\"'“”‘’「」$")
    return re.sub(r"\s+", "", s).rstrip("。.!！,，;；").lower()


def is_correct(completion: str, gold: Any) -> bool:
    """Whether ``completion``'s final answer equals ``gold`` (the rule in the module docstring)."""
    span, delimited = answer_span(completion)
    gold_numbers = numbers(str(gold)) if not isinstance(gold, (int, float)) else [float(gold)]
    if len(gold_numbers) == 1 and not math.isnan(gold_numbers[0]):
        found = numbers(span) if delimited else numbers(completion)
        if not found:
            return False
        pred = found[0] if delimited else found[-1]
        g = gold_numbers[0]
        return abs(pred - g) <= 1e-6 * max(1.0, abs(g))
    if not delimited:
        lines = [ln for ln in completion.strip().split("\n") if ln.strip()]
        span = lines[-1] if lines else ""
    return _plain(span) == _plain(str(gold))


# ----------------------------------------------------------------------------- built-ins
def _text(c: Any) -> str:
    """A completion as text: TRL passes conversational completions as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(c, list):
        return "".join(m.get("content", "") for m in c if isinstance(m, dict))
    return str(c)


def match_reward(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    """1.0 when the final answer equals the record's ``answer`` (see the module docstring), else 0.0."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None else float(is_correct(_text(c), a)) for c, a in zip(completions, answers)]


def format_reward(regex: str) -> Callable:
    pattern = re.compile(regex, re.DOTALL)

    def format(prompts, completions, **kwargs) -> list[float]:  # noqa: A001 - the metric's name
        return [1.0 if pattern.search(_text(c)) else 0.0 for c in completions]

    return format


def length_reward(budget: int, max_new_tokens: int) -> Callable:
    span = max(1, max_new_tokens - budget)

    def length(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [-min(1.0, max(0, len(ids) - budget) / span) for ids in completion_ids]

    return length


# ----------------------------------------------------------------------------- loading
@dataclass
class RewardFunc:
    name: str
    """The metric name (``rewards/NAME/mean``)."""
    spec: str
    """As written in reward_funcs."""
    fn: Callable[..., list]


def _user_function(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target).expanduser()
            if not path.is_file():
                raise RewardError(f"reward_funcs: {spec}: file {path} not found")
            name = f"_cv_reward_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except RewardError:
        raise
    except Exception as e:  # an import runs user code: any error means "cannot load it"
        raise RewardError(f"reward_funcs: {spec}: cannot import {target} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward_funcs: {spec}: {target} has no function {attr!r}")
    return fn


def load_rewards(specs: list[str], max_new_tokens: int) -> list[RewardFunc]:
    """Resolve ``reward_funcs`` entries; a RewardError naming the entry that cannot be."""
    out: list[RewardFunc] = []
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if spec == "match":
            name, fn = "match", match_reward
        elif kind == "format" and arg:
            try:
                fn = format_reward(arg)
            except re.error as e:
                raise RewardError(f"reward_funcs: {spec}: not a valid regular expression ({e})") from None
            name = "format"
        elif kind == "length" and (not arg or arg.isdigit()):
            budget = int(arg) if arg else max_new_tokens // 2
            name, fn = "length", length_reward(budget, max_new_tokens)
        elif ":" in spec and kind not in ("format", "length", "match"):
            fn = _user_function(spec)
            name = getattr(fn, "__name__", spec.rpartition(":")[2])
        else:
            raise RewardError(f"reward_funcs: {spec!r}: expected match, format:REGEX, length, length:N, "
                              "module:function or path/to/file.py:function")
        taken = {r.name for r in out}
        base, k = name, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        out.append(RewardFunc(name, spec, fn))
    return out


def score_group(
    funcs: list[RewardFunc], prompts: list, completions: list, completion_ids: list[list[int]], fields: dict[str, list], source: str
) -> list[list[float]]:
    """``[function][completion]`` rewards of one group (NaN for None); RewardError naming function and record."""
    out = []
    for f in funcs:
        try:
            values = f.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **fields)
        except Exception as e:  # user code: whatever it raises, say which function and which record
            raise RewardError(f"reward function {f.spec} raised {type(e).__name__}: {e} (record {source})") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(f"reward function {f.spec} returned {got} for {len(completions)} completions (record {source}); "
                              "expected a list with one float or None per completion")
        row = []
        for v in values:
            if v is None:
                row.append(math.nan)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) or hasattr(v, "__float__"):
                row.append(float(v))
            else:
                raise RewardError(f"reward function {f.spec} returned {v!r} (record {source}); expected a float or None")
        out.append(row)
    return out
