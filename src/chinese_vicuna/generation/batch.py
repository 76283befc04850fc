"""Continuous batching: concurrent requests decode together, one forward per token for all of them.

One scheduler thread owns the model. Each loop it (1) prefills the newly arrived requests together
(left-padded, in chunks, so requests cancelled while their long prompts are fed stop within a
chunk) and merges their KV cache into the running batch, (2) picks every row's next token with that row's own
settings (penalties, logit_bias, temperature, top-k/top-p, seed, grammar, logprobs: a
``RowSampler`` per request), (3) drops rows that ended or were cancelled, and (4) runs one batched
forward for the rest. New requests thus join at token boundaries and finished ones leave.

Rows are left-padded to a common cache length (the attention mask hides the padding; position
ids are each row's own), and adapters are chosen per row with peft's mixed-adapter batches
(``adapter_names``), so base and adapter requests share a batch. Greedy output does not depend on
the batch beyond floating-point noise: a row's logits differ from a solo run by ~1e-5 (float32
matmuls of another shape), which can only flip a near-tie between two tokens.

Written by hand because transformers' own continuous batching (``generate_batch``/paged
attention) has no streaming per-request token iterator with our per-row processors and grammar.
Beam search is not batched (it runs alone, under the engine lock).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .decode import (
    GenArgs,
    Step,
    TokenLogprob,
    forward_last,
    grammar_matchers,
    logit_bias_tensor,
    penalty_processors,
    seeded_generator,
    temperature_warpers,
    token_logprob,
    truncation_warpers,
)

PREFILL_CHUNK = 512


class RowSampler:
    """One request's next-token choice, exactly as ``iter_steps_batch`` makes it for a single row."""

    def __init__(self, gen: GenArgs, prompt: list[int], eos: list[int], vocab: int, device, tokenizer):
        self.gen, self.eos = gen, eos
        self.penalties = penalty_processors(gen, len(prompt), eos)
        self.temperature, self.truncation = temperature_warpers(gen), truncation_warpers(gen, eos)
        self.bias = logit_bias_tensor(gen, vocab, device)
        self.matcher = (grammar_matchers(tokenizer, gen, eos, vocab, 1) or [None])[0]
        self.rng = seeded_generator(gen, device)
        self.seq = torch.tensor([prompt], dtype=torch.long, device=device)

    def choose(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The next token from this row's logits ``[1, vocab]``."""
        scores = self.penalties(self.seq, logits) if self.penalties else logits
        if self.bias is not None:
            scores = scores + self.bias
        for w in self.temperature:
            scores = w(self.seq, scores)
        if self.matcher is not None:
            scores = scores.clone()
            self.matcher.mask(scores[0])
        logprobs = torch.log_softmax(scores, -1) if self.gen.logprobs is not None else None
        for w in self.truncation:
            scores = w(self.seq, scores)
        if self.gen.do_sample:
            tok = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=self.rng)[0, 0])
        else:
            tok = int(scores.argmax(-1)[0])
        self.seq = torch.cat([self.seq, self.seq.new_tensor([[tok]])], 1)
        if self.matcher is not None:
            self.matcher.advance(tok)
        return tok, (token_logprob(logprobs[0], tok, self.gen.logprobs) if logprobs is not None else None)


@dataclass
class _Row:
    prompt: list[int]
    gen: GenArgs
    adapter: str | None
    cancel: Callable[[], bool] | None
    out: queue.Queue = field(default_factory=queue.Queue)
    new: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    sampler: RowSampler | None = None
    logits: torch.Tensor | None = None
    done: bool = False
    admitted: bool = False
    abandoned: bool = False
    """The consumer stopped reading (a stop string, or it went away)."""

    def cancelled(self) -> bool:
        return self.abandoned or (self.cancel is not None and self.cancel())


class Batcher:
    """The scheduler over one engine's HF model; ``steps(...)`` is a drop-in token source."""

    def __init__(self, engine, max_batch: int = 8):
        self.engine, self.max_batch = engine, max_batch
        self._pending: queue.Queue[_Row] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.peak = 0
        """Largest batch decoded so far (for tests and /health)."""

    def steps(self, prompt: list[int], gen: GenArgs, adapter: str | None, cancel=None) -> Iterator[Step]:
        """Steps for one request, produced by the scheduler thread (``TextStream(steps=...)``)."""
        row = _Row(list(prompt), gen, adapter, cancel,
                   logprobs=[] if gen.logprobs is not None else None)
        # Built here, in the caller's thread: compiling a grammar must not stall the running batch.
        engine = self.engine
        row.sampler = RowSampler(gen, row.prompt, engine.eos_ids(), engine.vocab_size,
                                 next(engine.model.parameters()).device, engine.tokenizer)
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
                self._thread.start()
        self._pending.put(row)
        try:
            while True:
                item = row.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            row.abandoned = True

    # -- the scheduler thread -------------------------------------------------------------------

    @torch.no_grad()  # grad mode is per thread: this one must say so itself
    def _loop(self) -> None:
        rows: list[_Row] = []
        cache, mask = None, None
        while True:
            if not rows:
                rows.append(self._pending.get())  # idle: wait for work
            while len(rows) < self.max_batch and not self._pending.empty():
                rows.append(self._pending.get_nowait())
            try:
                with self.engine.lock:
                    cache, mask, rows = self._admit(rows, cache, mask)
                    rows, cache, mask = self._emit_and_prune(rows, cache, mask)
                    if rows:
                        self._decode(rows, cache, mask)
                        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            except Exception as e:  # a failed batch fails its requests, not the scheduler
                for r in rows:
                    r.out.put(e)
                    r.out.put(None)
                rows, cache, mask = [], None, None

    def _names(self, rows: list[_Row]) -> dict:
        if not self.engine.adapters:
            return {}
        self.engine.model.base_model.enable_adapter_layers()
        return {"adapter_names": [r.adapter if r.adapter in self.engine.adapters else "__base__" for r in rows]}

    def _prefill(self, rows: list[_Row]):
        """The new rows' own cache (left-padded together), mask and last logits; None if all were cancelled."""
        from transformers import DynamicCache

        from .decode import left_pad

        model = self.engine.model
        device = next(model.parameters()).device
        ids, mask = left_pad([r.prompt for r in rows], 0, device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        names = self._names(rows)
        logits = None
        for start in range(0, ids.shape[1], PREFILL_CHUNK):
            if all(r.cancelled() for r in rows):
                return None, None, None
            end = min(start + PREFILL_CHUNK, ids.shape[1])
            logits = forward_last(model, ids[:, start:end], mask[:, :end], pos[:, start:end], cache, **names)
        return cache, mask, logits

    def _admit(self, rows: list[_Row], cache, mask):
        """Prefill the rows that have no logits yet, together, and merge their cache into the batch's."""
        keep = [r for r in rows if r.admitted]
        new = [r for r in rows if not r.admitted]
        if not new:
            return cache, mask, keep
        own, own_mask, logits = self._prefill(new)
        if own is None:
            for r in new:
                r.out.put(None)  # cancelled during prefill
            return cache, mask, keep
        for i, r in enumerate(new):
            r.logits, r.admitted = logits[i : i + 1], True
        cache, mask = _merge(cache if keep else None, mask, own, own_mask)
        return cache, mask, keep + new

    def _emit_and_prune(self, rows: list[_Row], cache, mask):
        for r in rows:
            tok, lp = r.sampler.choose(r.logits)
            r.new.append(tok)
            if lp is not None:
                r.logprobs.append(lp)
            reason = "stop" if tok in r.sampler.eos else "length" if len(r.new) >= r.gen.max_new_tokens else None
            r.done = reason is not None
            r.out.put(Step(list(r.new), list(r.new), r.done, reason, list(r.logprobs) if r.logprobs is not None else None))
            if not r.done and r.cancelled():
                r.done = True
            if r.done:
                r.out.put(None)
        alive = [i for i, r in enumerate(rows) if not r.done]
        self.peak = max(self.peak, len(rows))
        if len(alive) == len(rows):
            return rows, cache, mask
        if not alive:
            return [], None, None
        index = torch.tensor(alive, device=mask.device)
        cache.batch_select_indices(index)
        mask = mask[index]
        # drop columns that are padding for every remaining row
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
        if lead:
            mask = mask[:, lead:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
        return [rows[i] for i in alive], cache, mask

    def _decode(self, rows: list[_Row], cache, mask) -> None:
        device = mask.device
        ids = torch.tensor([[r.new[-1]] for r in rows], dtype=torch.long, device=device)
        pos = torch.tensor([[len(r.prompt) + len(r.new) - 1] for r in rows], dtype=torch.long, device=device)
        full = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        logits = forward_last(self.engine.model, ids, full, pos, cache, **self._names(rows))
        for i, r in enumerate(rows):
            r.logits = logits[i : i + 1]


def _merge(cache, mask, own, own_mask):
    """Append new rows' cache to the batch's, left-padding whichever is shorter."""
    from transformers import DynamicCache

    if cache is None:
        return own, own_mask
    n, t = own_mask.shape[1], mask.shape[1]
    width = max(t, n)

    def pad(x: torch.Tensor, to: int) -> torch.Tensor:
        return x if x.shape[-2] == to else torch.cat([x.new_zeros(*x.shape[:-2], to - x.shape[-2], x.shape[-1]), x], -2)

    layers = [(torch.cat([pad(a.keys, width), pad(b.keys, width)]), torch.cat([pad(a.values, width), pad(b.values, width)]))
              for a, b in zip(cache.layers, own.layers)]
    mask = torch.cat([torch.cat([mask.new_zeros(mask.shape[0], width - t), mask], 1),
                      torch.cat([own_mask.new_zeros(own_mask.shape[0], width - n), own_mask], 1)])
    return DynamicCache(ddp_cache_data=layers), mask
