"""Shared fixtures: a tiny random LLaMA with the real SmolLM2 tokenizer, saved as an HF folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import PROJ, SAMPLES, make_llama_sp_tokenizer, make_tiny_llama, random_lora, write_jsonl  # noqa: F401


@pytest.fixture(scope="session")
def tokenizer():
    from chinese_vicuna.model.load import load_tokenizer, resolve_base_model

    # The embedded model is imported by `make install`; only its tokenizer is used here.
    return load_tokenizer(resolve_base_model(None))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random LlamaForCausalLM + the SmolLM2 tokenizer, as a local HF folder."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    rows = [
        {"instruction": f"问题{i}：{'天空为什么是蓝色的' if i % 2 else '一加一等于几'}？", "input": "", "output": f"【答】第{i}个回答。希望对你有帮助！"}
        for i in range(40)
    ]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A non-zero LoRA adapter (all seven projections) for the tiny model, with chinese_vicuna.json."""
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.model.adapters import write_meta

    d = tmp_path_factory.mktemp("tiny-adapter")
    model = random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), PROJ, seed=1, b_std=0.5)
    model.save_pretrained(d)
    write_meta(d, template="alpaca", system_prompt=None, base_model=str(tiny_model_dir))
    return d


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: syncing two intra-op threads costs more than it saves (100x slower on a busy CPU).

    Subprocesses (CLI tests, servers, the SmolLM2 runs) keep torch's default.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory):
    """A LLaMA SentencePiece tokenizer (``▁`` pieces, byte fallback, BOS added) trained in-process."""
    from chinese_vicuna.model.load import load_tokenizer

    return load_tokenizer(str(make_llama_sp_tokenizer(tmp_path_factory.mktemp("llama-sp"))))


@pytest.fixture(params=["smollm2", "llama"])
def any_tokenizer(request, tokenizer, llama_tokenizer):
    """Each test runs on SmolLM2's byte-level BPE and on a LLaMA SentencePiece tokenizer."""
    return tokenizer if request.param == "smollm2" else llama_tokenizer
