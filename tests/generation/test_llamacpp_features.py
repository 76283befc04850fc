"""llama.cpp backend: --n-ctx / --n-gpu-layers, JSON-schema grammars, logit_bias and logprobs."""

from __future__ import annotations

import json

import jsonschema
import pytest

from chinese_vicuna.config import ConfigError
from chinese_vicuna.generation.constrain import Constraint, ConstraintError, Tool, parse_tool_calls
from chinese_vicuna.generation.decode import GenArgs, instruction_conversation
from chinese_vicuna.generation.engine import Engine, load_engine

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
          "maximum": 99}, "tag": {"enum": ["晴", "雨"]}}, "required": ["ok", "n", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir):
    from chinese_vicuna.tools.gguf import export_gguf

    return export_gguf(str(tiny_model_dir), tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", gguf_type="f32")


@pytest.fixture(scope="module")
def cpp(tiny_gguf):
    engine = load_engine("llama.cpp", str(tiny_gguf), template="alpaca", n_ctx=256, n_gpu_layers=-1)
    yield engine
    engine.model.close()


def test_n_ctx_and_n_gpu_layers(cpp, tiny_gguf, tiny_model_dir):
    assert cpp.context_length == 256 and cpp.model.llm.n_ctx() == 256
    # llama-cpp-python passes -1 ("all layers") on as INT32_MAX
    assert cpp.model.n_gpu_layers == -1 and cpp.model.llm.model_params.n_gpu_layers == 2**31 - 1
    conv = instruction_conversation("天空" * 200)
    with pytest.raises(ConfigError, match="the context is 256"):
        cpp.generate(conv, GenArgs(max_new_tokens=4))
    with pytest.raises(ConfigError, match="llama.cpp settings"):
        load_engine("hf", str(tiny_model_dir), n_ctx=1024)


def test_json_schema_grammar_and_tools(cpp):
    conv = instruction_conversation("天气如何？")
    for seed in (None, 3):
        gen = GenArgs(max_new_tokens=60, repetition_penalty=1.0, do_sample=seed is not None, seed=seed,
                      temperature=1.0, top_k=0, top_p=1.0, constraint=Constraint("json", SCHEMA))
        out = cpp.generate(conv, gen)
        jsonschema.validate(json.loads(out.text), SCHEMA)
    tool = Tool("f", {"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"]})
    out = cpp.generate(conv, GenArgs(max_new_tokens=60, repetition_penalty=1.0,
                                     constraint=Constraint("tools", tools=(tool,), required=True, parallel=False)))
    head, calls = parse_tool_calls(out.text)
    assert [(c["name"], set(c["arguments"])) for c in calls] == [("f", {"x"})]
    assert calls[0]["arguments"]["x"] in (1, 2)
    with pytest.raises(ConstraintError):
        cpp.check_constraint(Constraint("json", {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}))


def test_logit_bias_and_logprobs_match_hf(cpp, tiny_model_dir):
    hf = Engine.load(str(tiny_model_dir), template="alpaca")
    conv = instruction_conversation("一加一等于几？")
    gen = GenArgs(max_new_tokens=5, repetition_penalty=1.0, logprobs=2)
    a, b = cpp.generate(conv, gen), hf.generate(conv, gen)
    assert a.text == b.text
    assert [lp.token for lp in a.logprobs] == [lp.token for lp in b.logprobs]
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-2)  # llama.cpp f32 kernels vs torch
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
    biased = GenArgs(max_new_tokens=3, repetition_penalty=1.0, logit_bias={4093: 100.0})
    assert cpp.generate(conv, biased).text == hf.generate(conv, biased).text == hf.tokenizer.decode([4093] * 3)


def test_lora_gguf_per_request_equals_merged_gguf(cpp, tiny_gguf, tiny_model_dir, tiny_adapter_dir, tmp_path):
    from chinese_vicuna.tools.gguf import export_gguf, gguf_config, write_lora_gguf

    lora = write_lora_gguf(tiny_adapter_dir, gguf_config(tiny_gguf), tmp_path / "a-lora.gguf")
    assert gguf_config(tiny_gguf)["num_attention_heads"] == 4
    merged_file = export_gguf(str(tiny_model_dir), tmp_path / "merged.gguf", adapters=[str(tiny_adapter_dir)],
                              gguf_type="f32")
    multi = load_engine("llama.cpp", str(tiny_gguf), [f"a={tiny_adapter_dir}", f"b={lora}"], template="alpaca")
    merged = load_engine("llama.cpp", str(merged_file), template="alpaca")
    assert multi.adapters == ["a", "b"]
    conv = instruction_conversation("天空为什么是蓝色的？")
    gen = GenArgs(max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.0)
    want_tuned, want_base = merged.generate(conv, gen).text, cpp.generate(conv, gen).text
    assert want_tuned != want_base
    # per request, in any order: the adapter (from its folder or its LoRA GGUF), the bare base, again
    assert multi.generate(conv, gen, adapter="a").text == want_tuned
    assert multi.generate(conv, gen).text == want_base
    assert multi.generate(conv, gen, adapter="b").text == want_tuned
    for e in (multi, merged):
        e.model.close()
