"""`--backend llama.cpp`: the same prompts, streaming and stops as the HF engine, through a GGUF file."""

import pytest
from helpers import run_cli

from chinese_vicuna.chat.session import ChatSession
from chinese_vicuna.config import ConfigError
from chinese_vicuna.generation.decode import GenArgs, instruction_conversation
from chinese_vicuna.generation.engine import Engine, LlamaCppEngine, load_engine

GREEDY = GenArgs(max_new_tokens=12, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir):
    from chinese_vicuna.tools.gguf import export_gguf

    return export_gguf(str(tiny_model_dir), tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", gguf_type="f32")


def test_llamacpp_engine_matches_hf_engine(tiny_model_dir, tiny_gguf):
    cpp = load_engine("llama.cpp", str(tiny_gguf), template="alpaca")
    hf = Engine.load(str(tiny_model_dir), template="alpaca")
    assert isinstance(cpp, LlamaCppEngine)
    conv = instruction_conversation("天空为什么是蓝色的？")
    assert cpp.prompt_ids(conv) == hf.prompt_ids(conv)
    a, b = cpp.generate(conv, GREEDY), hf.generate(conv, GREEDY)
    assert a.text == b.text and a.completion_tokens == b.completion_tokens
    stream = cpp.stream(conv, GREEDY)
    assert "".join(stream) == a.text and stream.finish_reason == a.finish_reason
    # the chat session runs on it unchanged
    session = ChatSession(cpp, gen=GREEDY)
    reply = "".join(session.send("你好"))
    assert len(session.history) == 1
    assert reply.strip() == hf.generate(session.conversation([], "你好"), GREEDY).text.strip()
    with pytest.raises(ConfigError, match="beam search is not available"):
        cpp.generate(conv, GenArgs(num_beams=2))
    cpp.model.close()


def test_generate_cli_backends_agree(tiny_model_dir, tiny_gguf):
    flags = ["--prompt", "一加一等于几？", "--template", "alpaca", "--max-new-tokens", "10", "--repetition-penalty", "1.0"]
    hf = run_cli("generate", "--model", tiny_model_dir, *flags).stdout
    cpp = run_cli("generate", "--backend", "llama.cpp", "--model", tiny_gguf, *flags).stdout
    assert hf == cpp and hf.strip()


def test_llamacpp_backend_errors(tiny_gguf, tiny_adapter_dir):
    with pytest.raises(ConfigError, match="needs --model FILE.gguf"):
        load_engine("llama.cpp", None)
    with pytest.raises(ConfigError, match="cannot map|could not load"):
        load_engine("llama.cpp", str(tiny_gguf), [f"x={tiny_gguf}"])  # a model GGUF is no LoRA adapter
    p = run_cli("chat", "--backend", "llama.cpp", "--model", "missing.gguf", check=False)
    assert p.returncode == 2 and "error: --backend llama.cpp needs --model FILE.gguf" in p.stderr
