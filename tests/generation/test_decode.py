"""The token iterator against transformers' generate, streaming invariants, UTF-8 and stop strings."""

from collections import deque

import pytest
import torch

from chinese_vicuna.generation.decode import GenArgs, TextStream, eos_ids, iter_steps, iter_steps_batch
from chinese_vicuna.generation.stream import IncrementalDecoder, StopFilter

PROMPT = [17, 250, 4093, 198, 15076, 229, 20887]


def hf(model, prompt, **kw):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         pad_token_id=0, eos_token_id=2, **kw)
    return out[0, len(prompt):].tolist()


def ours(model, prompt, gen):
    return deque(iter_steps(model, prompt, gen, [2], 0), maxlen=1)[0]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_hf(tiny_model, penalty):
    st = ours(tiny_model, PROMPT, GenArgs(max_new_tokens=32, repetition_penalty=penalty))
    assert st.committed == hf(tiny_model, PROMPT, max_new_tokens=32, do_sample=False, repetition_penalty=penalty)
    assert st.finish_reason in ("length", "stop")


@pytest.mark.parametrize("beams, penalty", [(3, 1.0), (4, 1.2)])
def test_beam_search_equals_hf(tiny_model, beams, penalty):
    gen = GenArgs(max_new_tokens=20, num_beams=beams, repetition_penalty=penalty)
    st = ours(tiny_model, PROMPT, gen)
    want = hf(tiny_model, PROMPT, max_new_tokens=20, do_sample=False, num_beams=beams, repetition_penalty=penalty)
    while want and want[-1] == 0:  # transformers pads hypotheses that ended early
        want.pop()
    assert st.committed == want
    greedy = ours(tiny_model, PROMPT, GenArgs(max_new_tokens=20, repetition_penalty=penalty)).committed
    assert st.committed != greedy  # beam search really searched


@pytest.fixture
def eos_prone(tiny_model):
    """The tiny model with a larger EOS row in lm_head: beams end (at different lengths) well before the limit."""
    with torch.no_grad():
        tiny_model.lm_head.weight[2] *= 3.0
    return tiny_model


def hf_beams(model, **kw) -> list[int]:
    want = hf(model, PROMPT, max_new_tokens=32, min_new_tokens=3, repetition_penalty=1.0, **kw)
    while want and want[-1] == 0:  # transformers pads a hypothesis that ended early
        want.pop()
    return want


@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_that_ends_on_eos_equals_hf(eos_prone, length_penalty, early_stopping):
    """Finished hypotheses, their length penalty and both stopping rules decide the answer here."""
    gen = GenArgs(max_new_tokens=32, min_new_tokens=3, num_beams=4, repetition_penalty=1.0,
                  length_penalty=length_penalty, early_stopping=early_stopping)
    st = ours(eos_prone, PROMPT, gen)
    want = hf_beams(eos_prone, do_sample=False, num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping)
    assert st.committed == want
    if (length_penalty, early_stopping) == (2.0, False):
        # a strong length reward keeps the search going until the limit: the best is a running beam
        assert len(want) == 32 and want[-1] != 2 and st.finish_reason == "length"
    else:
        assert 3 < len(want) < 32 and want[-1] == 2 and st.finish_reason == "stop"


def test_beam_search_stopping_rules_change_the_answer(eos_prone):
    """The cases above differ: early_stopping and length_penalty are really exercised, not bypassed."""
    gen = dict(max_new_tokens=32, min_new_tokens=3, num_beams=4, repetition_penalty=1.0)
    answers = {
        (lp, es): ours(eos_prone, PROMPT, GenArgs(length_penalty=lp, early_stopping=es, **gen)).committed
        for lp in (0.5, 1.0, 2.0) for es in (False, True)
    }
    assert answers[1.0, False] != answers[1.0, True]
    assert answers[2.0, False] != answers[2.0, True]
    assert answers[0.5, True] != answers[2.0, True]


@pytest.mark.parametrize("seed", range(6))
def test_beam_sampling_equals_hf_with_the_same_seed(eos_prone, seed):
    """Beam sampling draws 2k candidates and keeps them best first, exactly as transformers does."""
    warp = dict(temperature=1.5, top_k=20, top_p=0.95)
    gen = GenArgs(max_new_tokens=32, min_new_tokens=3, num_beams=3, do_sample=True, seed=seed, repetition_penalty=1.0,
                  **warp)
    st = ours(eos_prone, PROMPT, gen)
    torch.manual_seed(seed)  # transformers samples from the global generator; ours from one seeded alike
    want = hf_beams(eos_prone, do_sample=True, num_beams=3, **warp)
    assert st.committed == want and want[-1] == 2


def test_beam_committed_is_append_only_and_ends_on_best(tiny_model):
    seen = []
    for st in iter_steps(tiny_model, PROMPT, GenArgs(max_new_tokens=16, num_beams=3), [2], 0):
        seen.append(list(st.committed))
    for a, b in zip(seen, seen[1:]):
        assert b[: len(a)] == a
    assert len(seen[-1]) > 0


def test_no_repeat_ngram_and_min_new_tokens_match_hf(tiny_model):
    gen = GenArgs(max_new_tokens=24, no_repeat_ngram_size=2, min_new_tokens=10, repetition_penalty=1.0)
    assert ours(tiny_model, PROMPT, gen).committed == hf(
        tiny_model, PROMPT, max_new_tokens=24, do_sample=False, no_repeat_ngram_size=2, min_new_tokens=10
    )


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_model):
    g = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    a = ours(tiny_model, PROMPT, GenArgs(seed=3, **g)).committed
    assert a == ours(tiny_model, PROMPT, GenArgs(seed=3, **g)).committed
    assert a != ours(tiny_model, PROMPT, GenArgs(seed=4, **g)).committed
    g["top_k"] = 1
    greedy = ours(tiny_model, PROMPT, GenArgs(max_new_tokens=16, repetition_penalty=1.0)).committed
    assert ours(tiny_model, PROMPT, GenArgs(seed=5, **g)).committed == greedy


def test_beam_sampling_runs_and_is_seeded(tiny_model):
    gen = GenArgs(max_new_tokens=12, num_beams=3, do_sample=True, seed=1, temperature=1.0)
    assert ours(tiny_model, PROMPT, gen).committed == ours(tiny_model, PROMPT, gen).committed


def test_left_padded_batch_equals_single(tiny_model):
    prompts = [PROMPT, PROMPT[:3], [5, 6, 7, 8, 9]]
    gen = GenArgs(max_new_tokens=12, repetition_penalty=1.0)
    batch = deque(iter_steps_batch(tiny_model, prompts, gen, [2], 0), maxlen=1)[0]
    for p, st in zip(prompts, batch):
        assert st.committed == ours(tiny_model, p, gen).committed


@pytest.mark.parametrize("beams", [1, 3])
def test_streamed_text_equals_final_text(tiny_model, tokenizer, beams):
    gen = GenArgs(max_new_tokens=24, num_beams=beams)
    ts = TextStream(tiny_model, tokenizer, PROMPT, gen)
    deltas = list(ts)
    final = ours(tiny_model, PROMPT, gen)
    assert "".join(deltas) == ts.text == tokenizer.decode(final.committed, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas[:-1])
    assert ts.completion_tokens == len(final.committed) and ts.prompt_tokens == len(PROMPT)


def test_stop_string_cuts_and_never_leaks(tiny_model, tokenizer):
    gen = GenArgs(max_new_tokens=30, repetition_penalty=1.0)
    full = TextStream(tiny_model, tokenizer, PROMPT, gen).run()
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    ts = TextStream(tiny_model, tokenizer, PROMPT, gen, stop_strings=[stop])
    text = "".join(ts)
    assert text == full[: full.find(stop)] and ts.finish_reason == "stop"


def test_incremental_decoder_never_emits_half_a_character(tokenizer):
    ids = tokenizer("长城很长，黄河很黄。", add_special_tokens=False)["input_ids"]
    assert len(ids) > 10  # byte-level BPE splits these characters across tokens
    dec = IncrementalDecoder(tokenizer)
    deltas = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(deltas) == "长城很长，黄河很黄。"
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens completed no character and were held back
    cut = IncrementalDecoder(tokenizer)
    first_char = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]) == "长")
    assert cut.push(ids[: first_char + 1]) == "长" and cut.flush() == ""  # a half character is never emitted


def test_stop_filter_holds_partial_stop_strings():
    f = StopFilter(["User:"])
    assert f.push("你好 Us") == "你好 "
    assert f.push("e") == ""
    assert f.push("r: 再见") == "" and f.stopped
    g = StopFilter(["User:"])
    assert g.push("abc U") == "abc " and g.push("nicode") == "Unicode" and g.flush() == ""


def test_eos_ids_merges_config_and_tokenizer(tiny_model, tokenizer):
    tiny_model.generation_config.eos_token_id = [2, 7]
    assert eos_ids(tiny_model, tokenizer) == [2, 7]
