"""One token iterator for greedy, sampling, beam search and beam sampling, with penalties.

Everything that generates (terminal chat, web UI, API server, batch ``generate``) consumes
``iter_steps``/``TextStream``. Logits processors are transformers' own classes; the loop is ours
so that every strategy can stream — beam search included.

Beam search follows transformers' ``_beam_search`` step for step (top ``2k`` candidates, or
``2k`` sampled ones sorted by score for beam sampling; the top ``k`` that end become finished
hypotheses scored ``logp / len**length_penalty``; the same early-stop rules), so its result equals
``model.generate(num_beams=k)``, and with the same seed ``generate(num_beams=k, do_sample=True)``. While it runs, the
*committed* tokens are the common prefix of every live beam and kept hypothesis: no later step can
change them, so they stream append-only; ``best`` is the current best beam for typewriter UIs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..data.formats import Conversation, Message
from .args import GenArgs
from .stream import REPLACEMENT, IncrementalDecoder, StopFilter

PREFILL_CHUNK = 512
"""Prompts are fed in chunks of this many tokens, so a cancelled request stops within one chunk."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Step:
    committed: list[int]
    """New tokens that can no longer change (append-only across steps)."""
    best: list[int]
    """Current best hypothesis (beam search: may change; otherwise equals ``committed``)."""
    done: bool = False
    finish_reason: str | None = None
    """``stop`` (EOS) or ``length`` (max_new_tokens) once done."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per committed token when ``GenArgs.logprobs`` is set."""


def instruction_conversation(instruction: str, context: str = "", system: str | None = None) -> Conversation:
    msgs = [Message("system", system)] if system else []
    return Conversation(msgs + [Message("user", instruction, context)])


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Text before the earliest stop string."""
    return min((text[:i] for i in (text.find(s) for s in stops if s) if i >= 0), key=len, default=text)


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the generation config's and the tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def penalty_processors(gen: GenArgs, prompt_len: int, eos: list[int]):
    """transformers' repetition / no-repeat-ngram / min-new-tokens processors for ``gen``."""
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    procs = LogitsProcessorList()
    if gen.repetition_penalty and gen.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty))
    if gen.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(gen.no_repeat_ngram_size))
    if gen.min_new_tokens and eos:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, gen.min_new_tokens, eos))
    return procs


def _processors(gen: GenArgs, prompt_len: int, eos: list[int]):
    procs = penalty_processors(gen, prompt_len, eos)
    procs.extend(temperature_warpers(gen))  # same order as transformers: penalties, then warpers
    procs.extend(truncation_warpers(gen, eos))
    return procs


def temperature_warpers(gen: GenArgs) -> list:
    """transformers' temperature warper when sampling at a temperature other than 1, else none."""
    from transformers import TemperatureLogitsWarper

    return [TemperatureLogitsWarper(gen.temperature)] if gen.do_sample and gen.temperature and gen.temperature != 1.0 else []


def truncation_warpers(gen: GenArgs, eos: list[int]) -> list:
    """transformers' top-k / top-p warpers when sampling, else none."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    if not gen.do_sample:
        return []
    # as transformers: beam sampling keeps one token more than there are EOS ids, so that a
    # continuation that does not end always exists
    keep = (len(eos) + 1 if eos else 2) if gen.num_beams > 1 else 1
    procs = []
    if gen.top_k:
        procs.append(TopKLogitsWarper(gen.top_k, min_tokens_to_keep=keep))
    if gen.top_p < 1.0:
        procs.append(TopPLogitsWarper(gen.top_p, min_tokens_to_keep=keep))
    return procs


def logit_bias_tensor(gen: GenArgs, vocab: int, device) -> torch.Tensor | None:
    """``gen.logit_bias`` as a vocabulary-sized tensor to add to the logits (out-of-range ids dropped)."""
    if not gen.logit_bias:
        return None
    bias = torch.zeros(vocab, device=device)
    for tok, value in gen.logit_bias.items():
        if 0 <= tok < vocab:
            bias[tok] = value
    return bias


def _prefill(model, ids, mask, pos, cache, cancel) -> torch.Tensor | None:
    """The prompt's last logits, fed in chunks; None if ``cancel`` fired between chunks."""
    width = ids.shape[1]
    for start in range(0, width, PREFILL_CHUNK):
        end = min(start + PREFILL_CHUNK, width)
        logits = forward_last(model, ids[:, start:end], mask[:, :end], pos[:, start:end], cache)
        if end < width and cancel is not None and cancel():
            return None
    return logits


@functools.cache
def cache_kwarg() -> str:
    """transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name warns)."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def forward_last(model, ids, mask, pos, cache, **kwargs) -> torch.Tensor:
    """One forward pass through ``cache``; the float logits of the last position of each row."""
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
        **{cache_kwarg(): cache}, **kwargs,
    )
    return out.logits[:, -1, :].float()


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths as one left-padded id tensor and its attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def seeded_generator(gen: GenArgs, device) -> torch.Generator | None:
    """A torch generator seeded with ``gen.seed`` (``None`` without a seed)."""
    if gen.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(gen.seed)
    return g


@torch.no_grad()
def iter_steps_batch(
    model, prompts: list[list[int]], gen: GenArgs, eos: list[int], pad: int, cancel: Callable[[], bool] | None = None,
    tokenizer=None, repeat: int = 1,
) -> Iterator[list[Step]]:
    """Greedy or sampled decoding of a left-padded batch; yields every row's state after each token.

    With ``repeat`` each prompt is prefilled once and decoded ``repeat`` times (rows ``i * repeat`` to
    ``(i + 1) * repeat - 1`` are prompt ``i``'s), its prompt cache copied: GRPO's groups.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad, device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    penalties, temperature = penalty_processors(gen, ids.shape[1], eos), temperature_warpers(gen)
    truncation = truncation_warpers(gen, eos)
    rng = seeded_generator(gen, device)
    cache = DynamicCache(config=model.config)
    logits = _prefill(model, ids, mask, pos, cache, cancel)
    if logits is None:
        return
    if repeat > 1:
        cache.batch_repeat_interleave(repeat)
        logits, ids, mask, pos = (x.repeat_interleave(repeat, 0) for x in (logits, ids, mask, pos))
        prompts = [p for p in prompts for _ in range(repeat)]
    bias = logit_bias_tensor(gen, logits.shape[-1], device)
    matchers = grammar_matchers(tokenizer, gen, eos, logits.shape[-1], len(prompts))
    seqs = ids
    new: list[list[int]] = [[] for _ in prompts]
    lps: list[list[TokenLogprob] | None] = [[] if gen.logprobs is not None else None for _ in prompts]
    steps = [Step(new[r], new[r], logprobs=lps[r]) for r in range(len(prompts))]
    for t in range(gen.max_new_tokens):
        # penalties, logit_bias, temperature, grammar mask: the distribution logprobs report;
        # then top-k / top-p truncation: the distribution sampled from
        scores = penalties(seqs, logits) if penalties else logits
        if bias is not None:
            scores = scores + bias
        for w in temperature:
            scores = w(seqs, scores)
        if matchers:
            scores = scores.clone()
            for r, m in enumerate(matchers):
                if not steps[r].done:
                    m.mask(scores[r])
        logprobs = torch.log_softmax(scores, -1) if gen.logprobs is not None else None
        for w in truncation:
            scores = w(seqs, scores)
        if gen.do_sample:
            nxt = torch.multinomial(torch.softmax(scores, -1), 1, generator=rng).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        for r, tok in enumerate(nxt.tolist()):
            st = steps[r]
            if st.done:
                nxt[r] = pad
                continue
            new[r].append(tok)
            if matchers:
                matchers[r].advance(tok)
            if logprobs is not None:
                lps[r].append(token_logprob(logprobs[r], tok, gen.logprobs))
            if tok in eos:
                st.done, st.finish_reason = True, "stop"
            elif t + 1 == gen.max_new_tokens:
                st.done, st.finish_reason = True, "length"
        yield steps
        if all(s.done for s in steps) or (cancel is not None and cancel()):
            return
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        logits = forward_last(model, nxt[:, None], mask, pos, cache)


def token_logprob(row: torch.Tensor, tok: int, k: int) -> TokenLogprob:
    """``tok``'s log-probability in ``row`` and the ``k`` most likely alternatives."""
    top = torch.topk(row, k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(tok, float(row[tok]), pairs)


def grammar_matchers(tok, gen: GenArgs, eos: list[int], vocab: int, rows: int) -> list:
    """One grammar matcher per row when the reply is constrained."""
    if gen.constraint is None:
        return []
    from .constrain import Matcher, compile_grammar, ll_tokenizer

    if tok is None:
        raise ValueError("constrained decoding needs the tokenizer (pass tokenizer=)")
    llt = ll_tokenizer(tok, vocab, eos)
    grammar = compile_grammar(gen.constraint, llt)
    return [Matcher(grammar, llt, eos) for _ in range(rows)]


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    first = seqs[0]
    n = len(first)
    for s in seqs[1:]:
        n = min(n, len(s))
        for i in range(n):
            if s[i] != first[i]:
                n = i
                break
    return first[:n]


@torch.no_grad()
def iter_steps_beam(
    model, prompt: list[int], gen: GenArgs, eos: list[int], pad: int, cancel: Callable[[], bool] | None = None
) -> Iterator[Step]:
    """Beam search (or beam sampling) for one prompt, as transformers does it, streaming as it goes."""
    from transformers import DynamicCache

    if gen.constraint is not None or gen.logprobs is not None or gen.logit_bias:
        raise ValueError("beam search does not support constraints, logprobs or logit_bias")

    device = next(model.parameters()).device
    k, plen = gen.num_beams, len(prompt)
    keep = max(2, 1 + len(eos)) * k
    lp = gen.length_penalty
    procs = _processors(gen, plen, eos)
    rng = seeded_generator(gen, device)
    ids = torch.tensor([prompt] * k, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1)
    cache = DynamicCache(config=model.config)
    logits = forward_last(model, ids, mask, pos, cache)
    running = ids
    run_scores = torch.full((k,), -1e9, device=device)
    run_scores[0] = 0.0
    fin: list[tuple[float, list[int]]] = []  # kept hypotheses: (score, new tokens), best first
    improvable = True
    step = Step([], [])
    eos_t = torch.tensor(eos, device=device)
    for t in range(gen.max_new_tokens):
        logp = procs(running, torch.log_softmax(logits, -1))
        acc = (logp + run_scores[:, None]).view(-1)
        if gen.do_sample:
            idx = torch.multinomial(torch.softmax(acc, -1), keep, generator=rng)
            # Best first, as transformers sorts them: only the top k of the candidates may become
            # finished hypotheses, so the order decides which sampled endings are kept.
            vals, order = acc[idx].sort(descending=True)
            idx = idx[order]
        else:
            vals, idx = torch.topk(acc, keep)
        vocab = logp.shape[-1]
        beam, tok = idx // vocab, idx % vocab
        cand = torch.cat([running[beam], tok[:, None]], 1)
        hits = torch.isin(tok, eos_t) | (t + 1 == gen.max_new_tokens)
        # Finished hypotheses: only candidates ranked in the top k, unless adding is pointless
        # (no running beam can beat the kept ones, or early_stopping and k are kept already).
        if improvable and not (gen.early_stopping and len(fin) == k):
            for j in range(k):
                if hits[j]:
                    fin.append((float(vals[j]) / (t + 1) ** lp, cand[j, plen:].tolist()))
            fin = sorted(fin, key=lambda x: -x[0])[:k]
        run_vals = vals + hits.float() * -1e9
        order = torch.topk(run_vals, k).indices
        running, run_scores = cand[order], run_vals[order]
        cache.reorder_cache(beam[order])
        best_possible = float(run_scores[0]) / (t + 1) ** lp
        worst_fin = fin[-1][0] if len(fin) == k else -1e9
        improvable = improvable and best_possible > worst_fin
        done = not improvable or bool(hits.all()) or (gen.early_stopping and len(fin) == k)
        live = [s[plen:].tolist() for s in running] if not done else []
        pool = live + [h for _, h in fin]
        committed = _common_prefix(pool) if not done else fin[0][1]
        step = Step(
            committed,
            fin[0][1] if done else live[0],
            done,
            ("stop" if fin[0][1] and fin[0][1][-1] in eos else "length") if done else None,
        )
        yield step
        if done or (cancel is not None and cancel()):
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        logits = forward_last(model, running[:, -1:], mask, pos, cache)


def iter_steps(
    model, prompt: list[int], gen: GenArgs, eos: list[int], pad: int, cancel=None, tokenizer=None
) -> Iterator[Step]:
    """The token iterator for one prompt, whatever the strategy (``tokenizer``: for constraints)."""
    if gen.num_beams > 1:
        yield from iter_steps_beam(model, prompt, gen, eos, pad, cancel)
    else:
        for steps in iter_steps_batch(model, [prompt], gen, eos, pad, cancel, tokenizer=tokenizer):
            yield steps[0]


class TextStream:
    """Iterate for text deltas (UTF-8 safe, cut before any stop string).

    After (or during) iteration: ``text`` (what was yielded), ``best_text`` (current best beam,
    for typewriter display), ``finish_reason`` (``stop``/``length``/``cancelled``),
    ``prompt_tokens`` and ``completion_tokens``.
    """

    def __init__(
        self, model, tokenizer, prompt_ids: list[int], gen: GenArgs, stop_strings=(), cancel=None, steps=None
    ):
        self.model, self.tokenizer, self.prompt_ids, self.gen = model, tokenizer, prompt_ids, gen
        self.stops = tuple(stop_strings)
        self.cancel = cancel
        # Another token source (the llama.cpp backend) can stand in for the model: a callable
        # returning an iterator of Step.
        self.steps = steps
        self.text = self.best_text = ""
        self.finish_reason: str | None = None
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.logprobs: list[TokenLogprob] = []
        """Per generated token when ``gen.logprobs`` is set (filled as tokens are committed)."""

    def __iter__(self) -> Iterator[str]:
        tok = self.tokenizer
        dec, stop = IncrementalDecoder(tok), StopFilter(self.stops)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.steps is not None:
            steps = self.steps()
        else:
            steps = iter_steps(self.model, self.prompt_ids, self.gen, eos_ids(self.model, tok), pad, self.cancel, tok)
        st = None
        for st in steps:
            if st.logprobs is not None:
                self.logprobs = st.logprobs
            delta = stop.push(dec.push(st.committed[len(dec.ids) :]))
            self.completion_tokens = len(st.best) if not st.done else len(st.committed)
            if self.gen.num_beams > 1 and not st.done:
                self.best_text = cut_at_stop(tok.decode(st.best, skip_special_tokens=True), self.stops)
            if delta:
                self.text += delta
                self.best_text = self.text if self.gen.num_beams == 1 else self.best_text
                yield delta
            if stop.stopped:
                self.finish_reason = "stop"
                steps.close()
                break
            if self.cancel is not None and self.cancel() and not st.done:
                self.finish_reason = "cancelled"
                steps.close()
                break
        else:
            if st is None and self.cancel is not None and self.cancel():  # cancelled during prefill
                self.finish_reason = "cancelled"
                return
            self.finish_reason = (st.finish_reason if st is not None else None) or "length"
            tail = stop.push(dec.flush())
            tail += stop.flush()
            if stop.stopped:
                self.finish_reason = "stop"
            if tail:
                self.text += tail
                yield tail
        self.best_text = self.text

    def run(self) -> str:
        """Consume the stream; return the full text."""
        for _ in self:
            pass
        return self.text


@torch.no_grad()
def generate_batch(model, renderer, convs: list[Conversation], gen: GenArgs) -> list[str]:
    """Replies for conversations ending with a user message (batched greedy/sampling, else one by one)."""
    tok = renderer.tokenizer
    prompts = [renderer.prompt_ids(c) for c in convs]
    stops = renderer.template.stop_strings
    if gen.num_beams > 1:
        return [TextStream(model, tok, p, gen, stops).run().strip() for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    final: list[Step] = []
    for final in iter_steps_batch(model, prompts, gen, eos_ids(model, tok), pad):
        for st in final:  # a row that printed a stop string is finished too (stops span few tokens)
            if not st.done and stops and any(s in tok.decode(st.committed[-32:], skip_special_tokens=True) for s in stops):
                st.done, st.finish_reason = True, "stop"
    # a character cut in half by max_new_tokens decodes as U+FFFD: drop it, as the streams do
    texts = [tok.decode(st.committed, skip_special_tokens=True).rstrip(REPLACEMENT) for st in final]
    return [cut_at_stop(t, stops).strip() for t in texts]
