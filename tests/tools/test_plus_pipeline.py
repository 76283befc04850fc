"""Chinese-LLaMA-Alpaca's Plus pipeline on a scaled replica: base -> LLaMA-Plus LoRA -> Alpaca-Plus LoRA.

The replica keeps what makes the real one hard and drops the size: a 32000-piece LLaMA
SentencePiece tokenizer, a "Plus" LoRA whose tokenizer adds about a thousand Chinese pieces with
``embed_tokens``/``lm_head`` in ``modules_to_save``, and an "Alpaca-Plus" LoRA trained on top of it
that adds one more token (the pad: 49953 -> 49954 in the original). Both are saved the 2023 way,
as ``adapter_model.bin`` next to their tokenizer. ``merge`` must apply them in order.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import PROJ, SAMPLES, make_tiny_llama, random_lora
from helpers import run_cli as cli

from chinese_vicuna.model.load import load_tokenizer
from chinese_vicuna.model.vocab import extend_tokenizer, read_texts, train_sentencepiece
from chinese_vicuna.tools.merge import merge_adapters

LLAMA_VOCAB = 32000
ENGLISH = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The quick brown fox jumps over the lazy dog near the river bank, and 12345 numbers follow.",
    "Language models learn to predict the next token from a large amount of text.",
] * 20


def llama_tokenizer(out: Path) -> Path:
    """A LLaMA-style SentencePiece tokenizer of exactly 32000 pieces (<unk>=0, <s>=1, </s>=2, byte fallback).

    A few KB of text cannot teach 32000 merges, so the learned pieces are padded with UNUSED pieces
    (never produced by encoding) up to LLaMA's size: ids and vocabulary size are what matter here.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    out.mkdir(parents=True)
    zh = [t[:100] for t in read_texts([SAMPLES / "pretrain.txt"])[:10]]  # LLaMA knew few Chinese characters
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ENGLISH + zh), model_prefix=str(out / "tokenizer"), vocab_size=1500,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        normalization_rule_name="identity", character_coverage=0.9995, minloglevel=2, num_threads=1,
    )  # fmt: skip
    proto = pb.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    for i in range(LLAMA_VOCAB - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused{i}>", 0.0, pb.ModelProto.SentencePiece.UNUSED
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    (out / "tokenizer.vocab").unlink()
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "legacy": False}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def lora(model, seed: int, modules_to_save: list[str]):
    """A peft LoRA on every projection with non-zero B and perturbed full copies of ``modules_to_save``."""
    return random_lora(model, PROJ, seed=seed, modules_to_save=modules_to_save)


def save_2023_style(model, tokenizer, out: Path) -> Path:
    """save_pretrained, then the weights as ``adapter_model.bin`` (how peft 0.3 wrote them), plus the tokenizer."""
    from safetensors.torch import load_file

    model.save_pretrained(out)
    torch.save(load_file(str(out / "adapter_model.safetensors")), out / "adapter_model.bin")
    (out / "adapter_model.safetensors").unlink()
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def plus(tmp_path_factory):
    """(base folder, Plus adapter, Alpaca-Plus adapter, stacked peft reference model)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.model.adapters import load_adapter, read_adapter_state

    root = tmp_path_factory.mktemp("plus")
    base_tok_dir = llama_tokenizer(root / "llama-tok")
    base_tok = load_tokenizer(str(base_tok_dir))
    assert len(base_tok) == LLAMA_VOCAB
    base_dir = root / "llama"
    make_tiny_llama(LLAMA_VOCAB, hidden_size=16, intermediate_size=32).save_pretrained(base_dir)
    base_tok.save_pretrained(base_dir)

    # LLaMA-Plus: the tokenizer extended by the pieces of a Chinese SentencePiece model
    texts = read_texts([SAMPLES / "pretrain.txt"])[:40]
    sp = train_sentencepiece(texts, root / "zh-sp", vocab_size=1200, character_coverage=0.99)
    ext = extend_tokenizer(str(base_tok_dir), str(sp), str(root / "plus-tok"), method="sp")
    plus_tok = load_tokenizer(str(root / "plus-tok"))
    assert ext.old_size == LLAMA_VOCAB and 800 <= ext.added <= 1300 and len(plus_tok) == LLAMA_VOCAB + ext.added
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.resize_token_embeddings(len(plus_tok), mean_resizing=False)
    plus_dir = save_2023_style(lora(model, 1, ["embed_tokens", "lm_head"]), plus_tok, root / "plus-lora")

    # Alpaca-Plus: trained on base + Plus merged, with one more token (the pad)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), str(plus_dir)).merge_and_unload()
    alpaca_tok = load_tokenizer(str(root / "plus-tok"))
    alpaca_tok.add_special_tokens({"pad_token": "[PAD]"})
    assert len(alpaca_tok) == len(plus_tok) + 1
    model.resize_token_embeddings(len(alpaca_tok), mean_resizing=False)
    alpaca_dir = save_2023_style(lora(model, 2, ["embed_tokens", "lm_head"]), alpaca_tok, root / "alpaca-lora")

    # The reference, nothing merged: Alpaca-Plus's full embedding/lm_head copies replace the base's (and
    # Plus's, which they were trained from), and both adapters' LoRA updates are active at once.
    ref = AutoModelForCausalLM.from_pretrained(base_dir)
    ref.resize_token_embeddings(len(alpaca_tok), mean_resizing=False)
    ref = load_adapter(ref, str(alpaca_dir), name="alpaca")
    plus_lora = {k: v for k, v in read_adapter_state(plus_dir).items() if "lora_" in k}
    ref.add_adapter("plus", LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, task_type="CAUSAL_LM"))
    set_peft_model_state_dict(ref, plus_lora, adapter_name="plus")
    ref.base_model.set_adapter(["alpaca", "plus"])
    ref.eval()
    return base_dir, plus_dir, alpaca_dir, ref, alpaca_tok


def test_plus_and_alpaca_plus_merge_in_order(plus, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, plus_dir, alpaca_dir, ref, alpaca_tok = plus
    text = read_texts([SAMPLES / "pretrain.txt"])[25][:40] + " The quick brown fox."  # Chinese LLaMA never saw
    ids = alpaca_tok(text, return_tensors="pt")["input_ids"]
    assert ids.max() >= LLAMA_VOCAB  # the Chinese pieces Plus added are in use
    ids = torch.cat([ids, torch.tensor([[alpaca_tok.pad_token_id, 5, LLAMA_VOCAB + 3]])], dim=1)
    with torch.no_grad():
        want = ref(ids).logits
    assert want.shape[-1] == len(alpaca_tok)
    ref.base_model.set_adapter(["alpaca"])  # without Plus's LoRA the answer must differ: it is not a no-op
    with torch.no_grad():
        assert (ref(ids).logits - want).abs().max() > 1e-2
    ref.base_model.set_adapter(["alpaca", "plus"])
    out_mem = merge_adapters(str(base_dir), [str(plus_dir), str(alpaca_dir)], tmp_path / "in-memory")
    out_low = tmp_path / "low-memory"
    p = cli("merge", "--model", base_dir, "--adapter", plus_dir, "--adapter", alpaca_dir, "--out", out_low,
            "--low-memory")  # fmt: skip
    assert "merged 2 adapter(s)" in p.stdout
    for out in (out_mem, out_low):
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert merged.config.vocab_size == len(alpaca_tok)
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=0)
        tok = load_tokenizer(str(out))
        assert len(tok) == len(alpaca_tok) and tok.get_vocab() == alpaca_tok.get_vocab()
        assert tok(text)["input_ids"] == alpaca_tok(text)["input_ids"]
        assert tok.pad_token == "[PAD]" and tok.pad_token_id == len(alpaca_tok) - 1
