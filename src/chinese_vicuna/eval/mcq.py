"""Multiple-choice scoring shared by C-Eval and CMMLU: CSV questions, prompts to ids, letter scores.

A question's prompt ends where the answer letter goes (``答案：`` / ``答案是：``, or the template's
response header with ``--with-prompt``). The default prediction is the letter A–D whose token has
the highest log-probability at that position, all four letters read from one forward pass.
Prompts of a subject share their header and solved examples, so they are scored in batches
(``batch_size``) after one forward pass over the longest token prefix they all share, whose KV
cache every batch reuses. ``batch_size=1, prefix_cache=False`` is the plain one-question-at-a-time
loop; both give the same predictions and log-probs.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..data.datasets import DataError

CHOICES = ("A", "B", "C", "D")
# a shared prefix shorter than this is not worth a separate forward pass and cache copies
MIN_CACHED_PREFIX = 16
# The answer in generated text, tried in order: "答案是B" / "答案：C"; a leading "B." or "B";
# else the first A-D that is not part of a Latin word ("选D" counts, "ABC" and "Because" do not).
ANSWER_PATTERNS = (
    r"答案\s*(?:是|为)?\s*[:：]?\s*([ABCD])",
    r"^\s*([ABCD])(?![A-Za-z])",
    r"(?<![A-Za-z])([ABCD])(?![A-Za-z])",
)


@dataclass
class Question:
    id: str
    question: str
    options: dict[str, str]
    answer: str | None  # None: unscored (an official test split has no answers)


def read_questions(
    path: str | os.PathLike,
    columns: dict[str, str],
    need_answer: bool = True,
    what: str = "benchmark",
) -> list[Question]:
    """Questions of one CSV file.

    Args:
        path: The CSV file.
        columns: Header names for ``id``, ``question``, ``A``..``D`` and ``answer``; an ``id`` of
            ``""`` is the unnamed index column CMMLU writes (the row number when absent).
        need_answer: Whether an empty or missing answer column is an error.
        what: Benchmark name for the "file not found" message.

    Raises:
        FileNotFoundError: No such file.
        DataError: ``file:line: column: expected ...`` for a missing column, a bad cell, an answer
            letter outside A–D, or a file without questions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for key, col in columns.items():
            if key == "id" or (key == "answer" and not need_answer):
                continue
            if col not in header:
                shown = ",".join(header) if header else "empty file"
                raise DataError(f"{path}:1: {col}: expected a column named {col!r} (header: {shown})")
        q_col, a_col = columns["question"], columns["answer"]
        out = []
        for n, row in enumerate(reader):
            where = f"{path}:{reader.line_num}"
            for col in (q_col, *(columns[c] for c in CHOICES)):
                if not isinstance(row.get(col), str) or (col == q_col and not row[col].strip()):
                    raise DataError(f"{where}: {col}: expected text")
            answer = (row.get(a_col) or "").strip().upper() or None
            if answer is None and need_answer:
                raise DataError(f"{where}: {a_col}: expected one of A, B, C, D, got an empty cell")
            if answer is not None and answer not in CHOICES:
                raise DataError(f"{where}: {a_col}: expected one of A, B, C, D, got {row[a_col]!r}")
            qid = (row.get(columns["id"]) or "").strip() or str(n)
            options = {c: row[columns[c]] for c in CHOICES}
            out.append(Question(qid, row[q_col], options, answer))
    if not out:
        raise DataError(f"{path}: no questions (only a header)")
    return out


def check_shots(shots: int) -> None:
    if not 0 <= shots <= 5:
        raise ConfigError(f"--shots: expected 0..5 (5 dev examples per subject), got {shots}")


def parse_answer(text: str) -> str | None:
    """The answer letter in generated text (``ANSWER_PATTERNS``, first match wins), else ``None``."""
    for pattern in ANSWER_PATTERNS:
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def letter_ids(tokenizer, prompt_text: str) -> tuple[list[int], int]:
    """Token id of each answer letter as the full string ``prompt_text + letter`` tokenizes it.

    The letter's token depends on what precedes it (SentencePiece writes ``▁A`` after a space or at
    a word start, byte-level BPE ``A`` or ``ĠA``), so it is read off the tokenized full string at
    the answer position, never guessed from the letter alone. A prompt ending in a space (``...:
    ``) loses its last token to the letter (``ĠA``): that token is then left out of the prompt,
    so the model predicts exactly the token the full string has there.

    Returns:
        The four letter ids and how many tokens to drop from the end of the prompt's ids.

    Raises:
        ConfigError: A letter does not tokenize as one token at the end of the full string.
    """
    texts = [prompt_text] + [prompt_text + c for c in CHOICES]
    base, *fulls = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    keep = len(base)
    for full in fulls:  # the prompt tokens every full string keeps
        k = 0
        while k < min(keep, len(full)) and full[k] == base[k]:
            k += 1
        keep = k
    for c, full in zip(CHOICES, fulls, strict=True):
        if len(full) != keep + 1:
            raise ConfigError(
                f"the answer letter {c!r} does not tokenize as one token after the prompt "
                f"(prompt ends {prompt_text[-12:]!r}); use --generate"
            )
    return [full[-1] for full in fulls], len(base) - keep


@dataclass
class Encoded:
    """One question's prompt as the model sees it."""

    text: str
    ids: list[int]
    letters: list[int] = field(default_factory=list)


class PromptEncoder:
    """Prompt text -> ids, bare (the benchmark's own prompt) or wrapped in an instruction template.

    With a template the prompt is the user message of a one-turn conversation rendered by
    :class:`~chinese_vicuna.data.tokenize.Renderer` (the whole string tokenized once, as in
    training and serving); the answer follows the template's response header.
    """

    def __init__(self, tokenizer, template=None, max_len: int = 4096):
        self.tokenizer, self.template, self.max_len = tokenizer, template, max_len
        self.renderer = None
        if template is not None:
            from ..data.tokenize import Renderer

            self.renderer = Renderer(tokenizer, template, cutoff_len=max_len)

    def encode(self, prompt: str) -> tuple[str, list[int]]:
        if self.renderer is None:
            return prompt, self.tokenizer(prompt)["input_ids"]
        from ..data.formats import Conversation, Message

        conv = Conversation([Message("user", prompt)])
        return self.template.text(conv, add_generation_prompt=True), self.renderer.prompt_ids(conv)

    def question(self, build: Callable[[int], str], n_examples: int, letters: bool, reserve: int = 0) -> Encoded:
        """Encode ``build(k)`` with the most examples ``k <= n_examples`` that fit the context.

        Examples are dropped from the end, as C-Eval's own code does; a prompt still too long keeps
        its last tokens.
        """
        limit = self.max_len - reserve
        for k in range(n_examples, -1, -1):
            text, ids = self.encode(build(k))
            if len(ids) <= limit or k == 0:
                break
        if not letters:
            return Encoded(text, ids[-limit:])
        letter, drop = letter_ids(self.tokenizer, text)
        return Encoded(text, ids[-limit:][: len(ids[-limit:]) - drop], letter)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs) - 1  # every row keeps at least its last token to score
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def score_letters(
    model,
    encoded: list[Encoded],
    batch_size: int = 8,
    prefix_cache: bool = True,
    pad_id: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Log-probabilities of A, B, C, D at each prompt's answer position.

    Rows are sorted by length and left-padded so that every row's answer position is the batch's
    last position (one logit row per question is computed). The longest token prefix shared by all
    prompts is run once and its KV cache copied into every batch when it is at least
    ``MIN_CACHED_PREFIX`` tokens long.
    """
    import torch
    from transformers import DynamicCache

    from ..generation.decode import cache_kwarg

    device = getattr(model, "device", "cpu")
    out: list[list[float]] = [[] for _ in encoded]
    seqs = [e.ids for e in encoded]
    n_prefix = _common_prefix(seqs) if prefix_cache and len(seqs) > 1 else 0
    cached = None
    with torch.no_grad():
        if n_prefix >= MIN_CACHED_PREFIX:
            kv = DynamicCache()
            model(input_ids=torch.tensor([seqs[0][:n_prefix]], device=device), use_cache=True, **{cache_kwarg(): kv})
            if kv.get_seq_length() == n_prefix:  # a model that keeps no cache is scored without one
                cached = [(layer.keys, layer.values) for layer in kv.layers]
        if cached is None:
            n_prefix = 0
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            tails = [seqs[i][n_prefix:] for i in rows]
            width = max(len(t) for t in tails)
            ids = torch.tensor([[pad_id] * (width - len(t)) + t for t in tails], device=device)
            tail_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)
            # positions count real tokens only, continuing after the shared prefix
            positions = (n_prefix + tail_mask.cumsum(-1) - 1).clamp(min=0)
            kwargs: dict = {"position_ids": positions, "logits_to_keep": 1}
            mask = tail_mask
            if cached is not None:
                b = len(rows)
                kwargs[cache_kwarg()] = DynamicCache(
                    [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in cached]
                )
                mask = torch.cat([torch.ones(b, n_prefix, dtype=mask.dtype, device=device), mask], dim=1)
            logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            for r, i in enumerate(rows):
                out[i] = logp[r, encoded[i].letters].tolist()
            if progress is not None:
                progress(len(rows))
    return out


def generate_letters(model, tokenizer, encoded: list[Encoded], max_new_tokens: int, stops=("\n\n",),
                     progress: Callable[[int], None] | None = None) -> list[str | None]:  # fmt: skip
    """Greedy answers, one question at a time, parsed with :func:`parse_answer`."""
    from ..generation.decode import GenArgs, TextStream

    gen = GenArgs(max_new_tokens=max_new_tokens, repetition_penalty=1.0)
    out = []
    for e in encoded:
        out.append(parse_answer(TextStream(model, tokenizer, e.ids, gen, stops).run()))
        if progress is not None:
            progress(1)
    return out


def argmax_letter(logps: list[float]) -> str:
    return CHOICES[max(range(len(CHOICES)), key=lambda k: logps[k])]
