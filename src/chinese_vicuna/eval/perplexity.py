"""Perplexity with the standard Hugging Face sliding-window method.

Windows of ``window`` tokens start every ``stride`` tokens; each window scores only the tokens no
earlier window scored (its tail), so every token is scored once, with up to ``window - stride``
tokens of context. ``stride == window`` scores non-overlapping chunks; a text shorter than the window
is one forward pass. Token ``0`` has no context and is never scored.
"""

from __future__ import annotations

import math

from ..config import ConfigError
from ..data.datasets import DataError


def check_window(window: int, stride: int) -> None:
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(
            f"--window/--stride: expected window >= 2 and 1 <= stride <= window, "
            f"got window={window}, stride={stride}"
        )


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` per window: tokens ``[begin, end)`` go in, the last ``scored`` are scored."""
    check_window(window, stride)
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        # the first token of the text has nothing before it, so it is never a target
        spans.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return [s for s in spans if s[2] > 0]


def perplexity(
    model, tokenizer, text: str, window: int = 512, stride: int = 256, progress: bool = True
) -> dict:
    """Perplexity of ``model`` on ``text`` (one token stream, BOS first if the tokenizer adds it).

    Returns:
        ``ppl``, ``nll`` (summed, nats), ``tokens``, ``scored_tokens``, ``windows``, ``window``, ``stride``
        and ``bits_per_char`` (summed NLL in bits over the text's characters; comparable across tokenizers,
        approximately, since the first token is not scored).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    ids = tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise DataError("the text has fewer than 2 tokens; nothing to score")
    spans = window_spans(len(ids), window, stride)
    device = getattr(model, "device", "cpu")
    nll, scored = 0.0, 0
    with torch.no_grad():
        for begin, end, n in tqdm(spans, desc="perplexity", unit="window", disable=not progress, leave=False):
            x = torch.tensor([ids[begin:end]], device=device)
            # logits of the n positions that predict the scored tail (plus the last, which is dropped)
            logits = model(input_ids=x, logits_to_keep=n + 1).logits[0, :-1].float()
            targets = x[0, end - begin - n :]
            nll += float(F.cross_entropy(logits, targets, reduction="sum"))
            scored += n
    return {
        "ppl": math.exp(nll / scored),
        "nll": nll,
        "tokens": len(ids),
        "scored_tokens": scored,
        "windows": len(spans),
        "window": window,
        "stride": stride,
        "bits_per_char": nll / math.log(2) / max(len(text), 1),
    }
