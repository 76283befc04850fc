"""Continuous batching: concurrent requests decode together and each gets what it would get alone."""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import pytest

from chinese_vicuna.generation import batch
from chinese_vicuna.generation.constrain import Constraint
from chinese_vicuna.generation.decode import GenArgs, instruction_conversation
from chinese_vicuna.generation.engine import Engine

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
LOGPROB_TOLERANCE = 1e-4
"""Batched vs solo logprobs (float32 matmuls of another shape): the documented noise bound."""


def _jobs():
    g = dict(repetition_penalty=1.0)
    return [  # (instruction, adapter, GenArgs, stops)
        ("天空为什么是蓝色的？", None, GenArgs(max_new_tokens=24, logprobs=2, **g), ()),
        ("写一首关于秋天的诗。" * 6, "a", GenArgs(max_new_tokens=16, logprobs=2, **g), ()),
        ("你好", None, GenArgs(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=50, top_p=0.9, seed=11,
                             repetition_penalty=1.2), ()),
        ("一加一等于几？", "a", GenArgs(max_new_tokens=30, constraint=Constraint("json", SCHEMA), **g), ()),
        ("What is 2 + 2?", None, GenArgs(max_new_tokens=18, logit_bias={4093: 3.0}, **g), ()),
        ("讲个故事", "a", GenArgs(max_new_tokens=12, min_new_tokens=12, no_repeat_ngram_size=2, **g), ()),
    ]


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tiny_adapter_dir):
    serial = Engine.load(str(tiny_model_dir), [f"a={tiny_adapter_dir}"], template="alpaca")
    batched = Engine.load(str(tiny_model_dir), [f"a={tiny_adapter_dir}"], template="alpaca")
    assert batched.enable_batching(4)
    return serial, batched


def _run(engine, job):
    text, adapter, gen, stops = job
    return engine.generate(instruction_conversation(text), gen, adapter=adapter, stop_strings=stops)


def test_concurrent_requests_equal_solo_runs(engines):
    serial, batched = engines
    jobs = _jobs()
    want = [_run(serial, j) for j in jobs]
    got: list = [None] * len(jobs)

    def worker(i: int) -> None:
        time.sleep(0.02 * i)  # arrivals spread out: later ones join a running batch
        got[i] = _run(batched, jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert batched.batcher.peak >= 3  # they really shared forwards
    for w, g in zip(want, got):
        assert g.text == w.text and g.finish_reason == w.finish_reason
        assert g.completion_tokens == w.completion_tokens
        assert [lp.token for lp in g.logprobs] == [lp.token for lp in w.logprobs]
        for a, b in zip(g.logprobs, w.logprobs):
            assert abs(a.logprob - b.logprob) <= LOGPROB_TOLERANCE
    jsonschema.validate(json.loads(got[3].text), SCHEMA)


def test_stop_and_cancel_leave_the_batch(engines):
    _, batched = engines
    conv = instruction_conversation("天空为什么是蓝色的？")
    full = batched.generate(conv, GenArgs(max_new_tokens=20, min_new_tokens=20, repetition_penalty=1.0)).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = batched.generate(conv, GenArgs(max_new_tokens=20, min_new_tokens=20, repetition_penalty=1.0),
                           stop_strings=[stop])
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    flag = threading.Event()
    stream = batched.stream(conv, GenArgs(max_new_tokens=200, min_new_tokens=200), cancel=flag.is_set)
    for i, _ in enumerate(stream):
        if i == 2:
            flag.set()
    assert stream.finish_reason == "cancelled" and stream.completion_tokens < 20
    # the scheduler is free again
    assert batched.generate(conv, GenArgs(max_new_tokens=4, repetition_penalty=1.0)).completion_tokens == 4


def test_cancel_during_batched_prefill(engines, monkeypatch):
    _, batched = engines
    monkeypatch.setattr(batch, "PREFILL_CHUNK", 4)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1  # the client leaves after the first chunk of its prompt

    stream = batched.stream(instruction_conversation("天空为什么是蓝色的？" * 4), GenArgs(max_new_tokens=50), cancel=cancel)
    assert stream.run() == "" and stream.finish_reason == "cancelled" and stream.completion_tokens == 0
    with pytest.raises(ValueError, match="no-such-format"):  # a bad grammar fails in the caller, not the batch
        batched.generate(instruction_conversation("x"), GenArgs(max_new_tokens=4, constraint=Constraint(
            "json", {"type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}}})))
    assert batched.generate(instruction_conversation("你好"), GenArgs(max_new_tokens=3)).completion_tokens == 3
