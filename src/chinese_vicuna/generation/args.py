"""``GenArgs``: every decoding setting, with its default and its help, in one dataclass.

The decoding flags of ``generate``, ``eval compare``, ``chat`` and ``webui`` are generated from
these fields (``generation/commands.py``), the terminal ``/set`` and the web UI check values against
their types (``chat/session.py``), and the API maps request fields onto them. Nothing heavy is
imported here: the flags are built for every ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class GenArgs:
    max_new_tokens: int = 128
    """Upper bound on generated tokens per reply."""
    min_new_tokens: int = 0
    """EOS is suppressed before this many tokens."""
    do_sample: bool = False
    """Sample (with beams: beam sampling) instead of greedy / beam search."""
    temperature: float = 0.7
    """Sampling temperature (when sampling): lower is more deterministic."""
    top_p: float = 0.9
    """Nucleus sampling (when sampling): keep the most likely tokens whose probabilities sum to this."""
    top_k: int = 40
    """Sampling (when sampling) from the k most likely tokens only (0: no limit)."""
    num_beams: int = 1
    """Beam search width (1: no beam search)."""
    repetition_penalty: float = 1.1
    """Logits of tokens already in the prompt or reply are divided by this (1: off)."""
    no_repeat_ngram_size: int = 0
    """No n-gram of this size occurs twice in the prompt + reply (0: off)."""
    length_penalty: float = 1.0
    """Beam scores are divided by length**length_penalty."""
    early_stopping: bool = False
    """Beam search: stop once ``num_beams`` hypotheses have ended (else: once none can be beaten)."""
    seed: int | None = None
    """Seed of the sampler, for reproducible samples (default: random)."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before sampling (OpenAI's ``logit_bias``)."""
    logprobs: int | None = None
    """Record each chosen token's log-probability and this many top alternatives (None: off)."""
    constraint: object | None = None
    """A ``constrain.Constraint`` the reply must match (grammar-masked decoding)."""


REQUEST_ONLY = ("logit_bias", "logprobs", "constraint")
"""Fields set per API request, not from the command line (a mapping, a count of alternatives, a grammar)."""


def flag_fields() -> list[dataclasses.Field]:
    """The fields that are command-line flags: every one but ``REQUEST_ONLY``."""
    return [f for f in dataclasses.fields(GenArgs) if f.name not in REQUEST_ONLY]
