"""Incremental text from token ids: never half a Chinese character, never a leaked stop string."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, UTF-8 safe.

    Byte-level tokenizers split a Chinese character (3 bytes in UTF-8) over several tokens;
    decoding a prefix then ends in U+FFFD. Such a tail is held back until the character is
    complete, so no consumer ever sees a replacement character or half a character.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty)."""
        self.ids += new_ids
        text = self._decode()
        stable = text.rstrip(REPLACEMENT)
        if not stable.startswith(self.emitted):
            # Some tokenizers re-space earlier text as context grows; hold until it settles again.
            return ""
        delta = stable[len(self.emitted) :]
        self.emitted = stable
        return delta

    def flush(self) -> str:
        """Everything not yet emitted. A character left incomplete by the token limit is dropped."""
        text = self._decode().rstrip(REPLACEMENT)
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text if delta or text.startswith(self.emitted) else self.emitted
        return delta


class StopFilter:
    """Cuts text at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: tuple[str, ...] | list[str] = ()):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer, self.stopped = self.buffer[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
