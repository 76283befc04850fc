"""Conversation -> (input_ids, labels), built from the template's own segments.

The label mask comes from the same pieces as the text (never from re-tokenizing a prefix and
guessing its length): each segment is tokenized once, and its ids are copied to ``labels`` when
the segment is trained, else ``-100``. Replies end with EOS, which is trained with the reply and
survives truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .formats import Conversation
from .templates import PromptTemplate, Segment

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
class _Piece:
    ids: list[int]
    seg: Segment


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` puts BOS first (LLaMA does; SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


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
        self.tokenizer = tokenizer
        self.template = template
        self.cutoff_len = cutoff_len
        self.mask = mask
        self.overlong = overlong
        self.eos = tokenizer.eos_token_id
        self.bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _pieces(self, conv: Conversation, gen: bool = False) -> list[_Piece]:
        return [_Piece(self.encode(s.text), s) for s in self.template.segments(conv, add_generation_prompt=gen)]

    def _assemble(self, pieces: list[_Piece]) -> Sample:
        last_turn = max((p.seg.turn for p in pieces), default=-1)
        ids, labels = list(self.bos), [IGNORE] * len(self.bos)
        for p in pieces:
            piece = p.ids + ([self.eos] if p.seg.eos else [])
            trained = self.mask == "none" or (
                p.seg.kind == "reply" and (self.mask == "assistant" or p.seg.turn == last_turn)
            )
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return Sample(ids, labels)

    @staticmethod
    def _length(pieces: list[_Piece]) -> int:
        return sum(len(p.ids) + p.seg.eos for p in pieces)

    def render(self, conv: Conversation) -> Sample | None:
        """Tokenize a training conversation; ``None`` when it is too long and overlong=drop.

        Over-long conversations lose their oldest whole turns first, then the end of the final
        user text, then the tail of the final reply (whose EOS is kept).
        """
        budget = self.cutoff_len - len(self.bos)
        pieces = self._pieces(conv)
        if self._length(pieces) <= budget:
            return self._assemble(pieces)
        if self.overlong == "drop":
            return None
        system = [m for m in conv.messages if m.role == "system"]
        turns = conv.turns
        for start in range(2, len(turns) - 1, 2):
            pieces = self._pieces(Conversation(system + turns[start:], conv.source))
            if self._length(pieces) <= budget:
                sample = self._assemble(pieces)
                sample.truncated = True
                return sample
        over = self._length(pieces) - budget
        for p in reversed(pieces):  # shorten user text of the final turn, latest block first
            if over > 0 and p.seg.kind == "user":
                cut = min(over, len(p.ids) - 1)
                p.ids = p.ids[: len(p.ids) - cut]
                over -= cut
        reply = pieces[-1] if pieces and pieces[-1].seg.kind == "reply" else None
        if over > 0 and reply is not None:
            cut = min(over, len(reply.ids))
            reply.ids = reply.ids[: len(reply.ids) - cut]
            over -= cut
        if over > 0:
            return None  # the template text alone does not fit the cutoff
        sample = self._assemble(pieces)
        sample.truncated = True
        return sample

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """Token ids of a generation prompt (conversation ending with the user's message)."""
        return self._assemble(self._pieces(conv, gen=True)).input_ids

    def text_ids(self, text: str) -> list[int]:
        """Raw text for continued pre-training: BOS? + tokens + EOS, every token trained."""
        return self.bos + self.encode(text) + [self.eos]
