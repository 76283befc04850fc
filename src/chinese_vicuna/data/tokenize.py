"""Conversation -> (input_ids, labels): the whole rendered string, tokenized once.

The template gives the text as segments (template text, user text, reply, reply terminator).
The segments are joined into one string, which is tokenized in a single call, exactly as vLLM,
llama.cpp, Ollama and the seed projects tokenize a prompt (tokenizing the pieces one by one would
give a SentencePiece tokenizer a ``▁`` at every piece start). The character offsets of the tokens
then say which tokens lie in a trained reply: a token is trained when its characters overlap a
trained segment. The terminator (EOS, or the template's own end marker) is trained with the reply
and survives truncation.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .formats import Conversation
from .templates import PromptTemplate, Segment, TemplateError

IGNORE = -100
MaskMode = Literal["assistant", "last", "none"]


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class _Encoded:
    """One tokenized render: ids, their character offsets, and the segments with their start offsets."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    segs: list[Segment]
    starts: list[int]
    """Character offset where each segment starts."""
    prefix: int = 0
    """Tokens added before the text (BOS), in no segment."""

    def owners(self, i: int) -> range:
        """Indices of the segments token ``i`` overlaps (empty for an added BOS)."""
        if i < self.prefix:
            return range(0)
        s, e = self.offsets[i]
        if e <= s:
            e = s + 1  # a zero-width token belongs where it stands
        first = max(bisect_right(self.starts, s) - 1, 0)
        last = max(bisect_right(self.starts, e - 1) - 1, first)
        return range(first, last + 1)


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` puts BOS first (LLaMA does; SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def chat_template(template: PromptTemplate, tokenizer) -> str:
    """``template`` as the Jinja chat template to save with a model that uses ``tokenizer``."""
    return template.jinja(bos=adds_bos(tokenizer))


def _metaspace(tokenizer) -> bool:
    """A SentencePiece-style tokenizer (``▁`` prefix); transformers does not save its ``legacy`` flag."""
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    return type(pre).__name__ == "Metaspace" and getattr(pre, "prepend_scheme", None) in ("first", "always")


def save_tokenizer(tokenizer, template: PromptTemplate, folder: str | os.PathLike) -> None:
    """Save ``tokenizer`` with ``template`` as its chat template, so that every engine feeds our ids.

    Chat engines (transformers, vLLM, llama-cpp-python) render the template, ``bos_token``
    included, and tokenize the string without adding specials. SentencePiece and llama.cpp put
    ``▁`` before text that follows a special token; a ``legacy: false`` HF tokenizer does not, so
    ``<s>Below`` would become ``<s> B elow`` instead of the trained ``<s> ▁Below``. Our templates
    have special tokens only at the ends (BOS first, EOS after the final reply), where both
    behaviours tokenize the text alike, so the saved tokenizer is switched to the SentencePiece
    behaviour (``legacy: true``). A model's own template (``auto``) keeps its tokenizer as trained.
    """
    own = tokenizer.chat_template
    tokenizer.chat_template = chat_template(template, tokenizer)
    try:
        tokenizer.save_pretrained(str(folder))
    finally:
        tokenizer.chat_template = own
    if template.models_own or not adds_bos(tokenizer) or not _metaspace(tokenizer):
        return
    folder = Path(folder)
    for name, edit in (("tokenizer_config.json", _legacy_config), ("tokenizer.json", _prefix_always)):
        path = folder / name
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            edit(data)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
            os.replace(tmp, path)


def _legacy_config(cfg: dict) -> None:
    cfg["legacy"] = True  # transformers builds the Metaspace pre-tokenizer from this flag


def _prefix_always(tj: dict) -> None:
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        pre["prepend_scheme"] = "always"


class Renderer:
    """Tokenizes conversations for training and prompts for generation, one way for both."""

    def __init__(
        self,
        tokenizer,
        template: PromptTemplate,
        cutoff_len: int = 256,
        mask: MaskMode = "assistant",
        overlong: Literal["truncate", "drop"] = "truncate",
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; replies could never end")
        if not getattr(tokenizer, "is_fast", True):
            raise TemplateError("exact label masks need a fast (tokenizers-backed) tokenizer with character offsets")
        self.tokenizer = tokenizer
        self.template = template
        self.cutoff_len = cutoff_len
        self.mask = mask
        self.overlong = overlong
        self.eos = tokenizer.eos_token_id
        self.bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _encode(self, conv: Conversation, gen: bool = False) -> _Encoded:
        segs = [s for s in self.template.segments(conv, gen, self.tokenizer.eos_token) if s.text]
        text = "".join(s.text for s in segs)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        # BOS as the model expects it: our templates get the tokenizer's; a model's own chat template
        # writes {{ bos_token }} itself where it wants one (chat engines then add none).
        prefix = 1 if self.bos and not self.template.models_own and ids[:1] != self.bos else 0
        if prefix:
            ids, offsets = self.bos + ids, [(0, 0), *offsets]
        starts, pos = [], 0
        for s in segs:
            starts.append(pos)
            pos += len(s.text)
        return _Encoded(ids, offsets, segs, starts, prefix)

    def _trained(self, seg: Segment, last_turn: int) -> bool:
        if self.mask == "none":
            return True
        return seg.kind in ("reply", "end") and (self.mask == "assistant" or seg.turn == last_turn)

    def _sample(self, enc: _Encoded, drop: set[int] = frozenset()) -> Sample:  # type: ignore[assignment]
        last_turn = max((s.turn for s in enc.segs), default=-1)
        ids, labels = [], []
        for i, tok in enumerate(enc.ids):
            if i in drop:
                continue
            owners = enc.owners(i)
            trained = any(self._trained(enc.segs[j], last_turn) for j in owners)
            ids.append(tok)
            labels.append(tok if trained else IGNORE)
        return Sample(ids, labels)

    def render(self, conv: Conversation) -> Sample | None:
        """Tokenize a training conversation; ``None`` when it is too long and overlong=drop.

        Over-long conversations lose their oldest whole turns first, then the end of the final
        user text (latest block first), then the tail of the final reply (whose terminator is kept).
        """
        enc = self._encode(conv)
        if len(enc.ids) <= self.cutoff_len:
            return self._sample(enc)
        if self.overlong == "drop":
            return None
        enc = self._drop_old_turns(conv, enc)
        over = len(enc.ids) - self.cutoff_len
        drop: set[int] = set()
        last_turn = max(s.turn for s in enc.segs)
        cuttable = [j for j, s in enumerate(enc.segs) if s.turn == last_turn and s.kind == "user"][::-1]
        cuttable += [j for j, s in enumerate(enc.segs) if s.turn == last_turn and s.kind == "reply"]
        for j in cuttable:
            if over <= 0:
                break
            inside = [i for i in range(len(enc.ids)) if list(enc.owners(i)) == [j]]
            keep = 1 if enc.segs[j].kind == "user" else 0  # a user block keeps a token; a reply may go
            for i in reversed(inside[keep:]):
                if over <= 0:
                    break
                drop.add(i)
                over -= 1
        if over > 0:
            return None  # the template text alone does not fit the cutoff
        sample = self._sample(enc, drop)
        sample.truncated = True
        return sample

    def _drop_old_turns(self, conv: Conversation, enc: _Encoded) -> _Encoded:
        """Drop the fewest oldest exchanges that bring the sample under the cutoff (keep the last)."""
        turns = conv.turns
        n_pairs = len(turns) // 2
        if n_pairs < 2:
            return enc
        per_turn = [0] * n_pairs
        for i in range(len(enc.ids)):
            owners = enc.owners(i)
            if owners and 0 <= enc.segs[owners[0]].turn < n_pairs:
                per_turn[enc.segs[owners[0]].turn] += 1
        system = [m for m in conv.messages if m.role == "system"]
        over, k = len(enc.ids) - self.cutoff_len, 0
        while k < n_pairs - 1 and over > 0:  # a first guess from this render's token counts
            over -= per_turn[k]
            k += 1
        while True:  # merges at the new start can differ by a token: re-check, drop one more if needed
            shorter = self._encode(Conversation(system + turns[2 * k :], conv.source))
            if len(shorter.ids) <= self.cutoff_len or k == n_pairs - 1:
                return shorter
            k += 1

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """Token ids of a generation prompt (conversation ending with the user's message)."""
        return self._encode(conv, gen=True).ids

    def text_ids(self, text: str) -> list[int]:
        """Raw text for continued pre-training: BOS? + tokens + EOS, every token trained."""
        return self.bos + self.encode(text) + [self.eos]
