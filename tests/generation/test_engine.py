import pytest

from chinese_vicuna.generation.decode import GenArgs, instruction_conversation
from chinese_vicuna.generation.engine import Engine


def test_engine_base_and_adapters(tiny_model_dir, tiny_adapter_dir):
    eng = Engine.load(str(tiny_model_dir), [f"a={tiny_adapter_dir}", f"b={tiny_adapter_dir}"])
    assert eng.adapters == ["a", "b"] and eng.template.name == "alpaca"
    conv = instruction_conversation("你好")
    gen = GenArgs(max_new_tokens=8)
    with_a = eng.generate(conv, gen, adapter="a")
    bare = eng.generate(conv, gen, adapter=None)
    assert with_a.text != bare.text
    assert eng.generate(conv, gen, adapter="a").text == with_a.text  # switching back and forth is exact
    assert with_a.prompt_tokens == len(eng.prompt_ids(conv))
    with pytest.raises(KeyError):
        eng.generate(conv, gen, adapter="nope")
