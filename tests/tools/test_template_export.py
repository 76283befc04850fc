"""The trained template survives merge, GGUF export and other engines.

For each template, an adapter is merged and exported; transformers' ``apply_chat_template`` on
the merged folder and llama-cpp-python's chat formatter on the GGUF's embedded template must
render our prompt text, and feed our token ids, on SmolLM2's BPE and on a LLaMA SentencePiece
tokenizer. Our own engines read the template back from the merged folder and the GGUF file.
"""

import json
from pathlib import Path

import pytest
from helpers import LLAMA2_TEMPLATE, make_llama_sp_tokenizer, make_tiny_llama, random_lora

from chinese_vicuna.data.formats import Conversation, Message
from chinese_vicuna.data.templates import get_template
from chinese_vicuna.data.tokenize import Renderer, save_tokenizer
from chinese_vicuna.model.adapters import write_meta
from chinese_vicuna.model.load import load_tokenizer

PROMPTS = {
    "single": [{"role": "user", "content": "介绍一下长城。"}],
    "input": [{"role": "user", "content": "翻译成英文", "input": "你好，世界"}],
    "multi": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
              {"role": "user", "content": "北京是哪里？"}],
}
CASES = [("alpaca", None), ("vicuna-chat", None), ("vicuna-chat", "你是一个医生。"), ("auto", None), ("auto", "你是一个医生。")]


@pytest.fixture(scope="module", params=["smollm2", "llama"])
def base(request, tmp_path_factory, tokenizer):
    """A tiny random LLaMA folder with SmolLM2's tokenizer, or with a LLaMA SentencePiece one (Llama-2 template)."""
    d = tmp_path_factory.mktemp(f"base-{request.param}")
    if request.param == "llama":
        tok = load_tokenizer(str(make_llama_sp_tokenizer(tmp_path_factory.mktemp("sp"))))
        tok.chat_template = LLAMA2_TEMPLATE
    else:
        tok = tokenizer
    make_tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return request.param, d


def make_adapter(folder: Path, base_dir: Path, template: str, system_prompt: str | None) -> Path:
    """A non-zero LoRA with the metadata and tokenizer training writes."""
    from transformers import AutoModelForCausalLM

    random_lora(AutoModelForCausalLM.from_pretrained(base_dir), ["q_proj", "v_proj"], seed=3).save_pretrained(folder)
    tok = load_tokenizer(str(base_dir))
    save_tokenizer(tok, get_template(template, tok, system_prompt), folder)
    write_meta(folder, template=template, system_prompt=system_prompt, base_model=str(base_dir))
    return folder


def conv_of(msgs) -> Conversation:
    return Conversation([Message(m["role"], m["content"], m.get("input", "")) for m in msgs])


def prompts_for(template: str):
    # a model's own template knows no Alpaca input block
    return {k: v for k, v in PROMPTS.items() if not (template == "auto" and k == "input")}


@pytest.mark.parametrize("template,system_prompt", CASES)
def test_merged_and_gguf_render_the_trained_prompt(base, tmp_path, template, system_prompt):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from chinese_vicuna.generation.engine import Engine, LlamaCppEngine
    from chinese_vicuna.tools.gguf import export_gguf, read_gguf_meta
    from chinese_vicuna.tools.merge import merge_adapters

    kind, base_dir = base
    adapter = make_adapter(tmp_path / "adapter", base_dir, template, system_prompt)
    merged = merge_adapters(str(base_dir), [str(adapter)], tmp_path / "merged", low_memory=template == "alpaca")
    assert json.loads((merged / "chinese_vicuna.json").read_text())["template"] == template
    # what we train with: the adapter's tokenizer and template
    tok = load_tokenizer(str(adapter))
    ours = get_template(template, tok, system_prompt)
    renderer = Renderer(tok, ours)
    bos = tok.bos_token if kind == "llama" and template != "auto" else ""  # Llama-2's template writes its own

    hf = AutoTokenizer.from_pretrained(merged)
    engine = Engine.load(str(merged))
    assert engine.template.name == template and engine.template.system_prompt == system_prompt
    gguf = export_gguf(str(merged), tmp_path / "model.gguf", gguf_type="f16")
    assert read_gguf_meta(gguf) == {"template": template, **({"system_prompt": system_prompt} if system_prompt else {})}
    llm = Llama(str(gguf), vocab_only=True, verbose=False)
    embedded = llm.metadata["tokenizer.chat_template"]
    assert embedded == hf.chat_template
    formatter = Jinja2ChatFormatter(embedded, eos_token=llm._model.token_get_text(llm.token_eos()),
                                    bos_token=llm._model.token_get_text(llm.token_bos()))
    for case, msgs in prompts_for(template).items():
        conv = conv_of(msgs)
        text = ours.text(conv, add_generation_prompt=True, eos=tok.eos_token)
        ids = renderer.prompt_ids(conv)
        if system_prompt:
            assert system_prompt in text
        # transformers on the merged folder: the same text and the same ids
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == bos + text, case
        assert hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"] == ids, case
        # our engine on the merged folder (template read back from it)
        assert engine.prompt_ids(conv) == ids, case
        # llama.cpp: the GGUF's embedded template through llama-cpp-python's chat formatter
        rendered = formatter(messages=msgs).prompt
        assert rendered == bos + text, case
        if not (kind == "llama" and template == "auto"):
            # (llama.cpp puts "▁" after every special token; a model's own template with specials
            # between texts, on a legacy=false SentencePiece tokenizer, differs there by design)
            assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids, case
    del llm
    cpp = LlamaCppEngine.load_gguf(str(gguf))
    assert cpp.template.name == template and cpp.template.system_prompt == system_prompt
    conv = conv_of(PROMPTS["multi"])
    assert cpp.prompt_ids(conv) == renderer.prompt_ids(conv)  # rendered and tokenized as we train


def test_vllm_gets_the_adapters_template(tmp_path, base):
    """serve --engine vllm: --chat-template is the trained template, BOS included where the model adds it."""
    from transformers import AutoTokenizer

    from chinese_vicuna.cli import build_parser
    from chinese_vicuna.serve.commands import vllm_command

    kind, base_dir = base
    adapter = make_adapter(tmp_path / "ad", base_dir, "vicuna-chat", "你是一个医生。")
    args, extra = build_parser().parse_known_args(["serve", "--engine", "vllm", "--model", str(base_dir),
                                                   "--adapter", f"doc={adapter}"])
    cmd = vllm_command(args, extra)
    path = Path(cmd[cmd.index("--chat-template") + 1])
    assert cmd[cmd.index("--lora-modules") + 1] == f"doc={adapter}"
    saved = AutoTokenizer.from_pretrained(adapter)
    assert path.read_text(encoding="utf-8") == saved.chat_template
    tok = load_tokenizer(str(adapter))
    ours = get_template("vicuna-chat", tok, "你是一个医生。")
    msgs = PROMPTS["multi"]
    rendered = saved.apply_chat_template(msgs, chat_template=path.read_text(encoding="utf-8"), tokenize=False,
                                         add_generation_prompt=True)
    bos = tok.bos_token if kind == "llama" else ""
    assert rendered == bos + ours.text(conv_of(msgs), add_generation_prompt=True, eos=tok.eos_token)
    # vLLM tokenizes with the tokenizer the adapter was trained with (its folder's)
    assert cmd[cmd.index("--tokenizer") + 1] == str(adapter)
    # a model without adapters (a merged one) needs no flag: its own chat template is the trained one
    args, extra = build_parser().parse_known_args(["serve", "--engine", "vllm", "--model", str(base_dir)])
    assert "--chat-template" not in vllm_command(args, extra) and "--tokenizer" not in vllm_command(args, extra)


def test_gguf_sentencepiece_vocabulary_tokenizes_like_transformers(base, tmp_path):
    """A LLaMA folder with tokenizer.json only (what save_pretrained writes): llama.cpp gets the
    merge order as piece scores and tokenizes whole texts exactly as transformers does."""
    from llama_cpp import Llama

    from chinese_vicuna.tools.gguf import export_gguf

    kind, base_dir = base
    if kind != "llama":
        pytest.skip("byte-level BPE keeps its merges in the GGUF")
    assert not (base_dir / "tokenizer.model").exists()
    gguf = export_gguf(str(base_dir), tmp_path / "m.gguf", gguf_type="f16")
    llm = Llama(str(gguf), vocab_only=True, verbose=False)
    tok = load_tokenizer(str(base_dir))
    lines = (Path(__file__).resolve().parents[2] / "data" / "samples" / "instruct.jsonl").read_text(encoding="utf-8")
    texts = [json.loads(x)["output"] for x in lines.splitlines()[-40:]] + [
        "The answer is 12345, and the quick brown fox jumps over the lazy dog.", "Hello,\n\nworld!  Two  spaces."]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text
