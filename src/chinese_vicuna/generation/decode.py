"""Batch generation from rendered prompts (the same Renderer as training builds the ids).

Prompts are left-padded and decoded together with ``model.generate``; replies are cut at the
first stop string of the template, so the next turn's header never leaks into an answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.formats import Conversation, Message
from ..data.tokenize import Renderer


@dataclass
class GenArgs:
    max_new_tokens: int = 128
    """Upper bound on generated tokens per reply."""
    min_new_tokens: int = 0
    """Lower bound (EOS is suppressed before it)."""
    do_sample: bool = False
    """Sample instead of greedy/beam search."""
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    num_beams: int = 1
    repetition_penalty: float = 1.1
    no_repeat_ngram_size: int = 0
    seed: int | None = None


def instruction_conversation(instruction: str, context: str = "", system: str | None = None) -> Conversation:
    msgs = [Message("system", system)] if system else []
    return Conversation(msgs + [Message("user", instruction, context)])


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Text before the earliest stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


@torch.no_grad()
def generate_batch(model, renderer: Renderer, convs: list[Conversation], args: GenArgs) -> list[str]:
    """Replies for a batch of conversations that end with a user message."""
    tok = renderer.tokenizer
    prompts = [renderer.prompt_ids(c) for c in convs]
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    if args.seed is not None:
        torch.manual_seed(args.seed)
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        do_sample=args.do_sample,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
    )
    if args.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    replies = []
    for row in out[:, width:]:
        text = tok.decode(row, skip_special_tokens=True)
        replies.append(cut_at_stop(text, renderer.template.stop_strings).strip())
    return replies
