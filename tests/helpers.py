"""Test helpers shared by the test modules (importable as `helpers`)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


def free_port() -> int:
    """A TCP port free on the loopback now (the OS picks it): no test uses a fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # large enough that a frozen random lm_head still lets LoRA move the loss visibly
        initializer_range=0.3,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).float()


PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_lora(model, targets: list[str], *, seed: int, r: int = 4, b_std: float = 0.3,
                modules_to_save: list[str] | None = None, **kw):  # fmt: skip
    """A peft LoRA (alpha 2r) drawn from ``seed``: non-zero lora_B and perturbed modules_to_save copies."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # lora_A is drawn by get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=modules_to_save,
                     task_type="CAUSAL_LM", **kw)  # fmt: skip
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(*args, check: bool = True, env: dict | None = None):
    """``python -m chinese_vicuna ARGS`` in a subprocess (the real entry point); asserts success by default."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "chinese_vicuna", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


SP_ENGLISH = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The following is a conversation between an AI assistant called Assistant and a human user called User.",
    "The quick brown fox jumps over the lazy dog near the river bank, and 12345 numbers follow.",
    "Language models learn to predict the next token from a large amount of text.",
    "### Instruction: ### Input: ### Response: User: Assistant: Hello world, this is a test.",
]


def make_llama_sp_tokenizer(out_dir: Path, vocab_size: int = 2000) -> Path:
    """A LLaMA-style SentencePiece tokenizer folder trained in-process on Chinese + English text.

    BPE with byte fallback, ``<unk>``=0 ``<s>``=1 ``</s>``=2, identity normalisation and the
    dummy-prefix ``▁``: what LLaMA-1/2 and Chinese-LLaMA ship. Loaded by transformers as
    LlamaTokenizer with ``legacy: false`` (the behaviour of current LLaMA tokenizer configs).
    """
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    zh = []
    for line in (SAMPLES / "instruct.jsonl").read_text(encoding="utf-8").splitlines()[:60]:
        rec = json.loads(line)
        zh += [rec["instruction"], rec["output"]]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_ENGLISH * 10 + zh), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2, normalization_rule_name="identity", character_coverage=0.9995, split_digits=True,
        num_threads=1,
    )  # fmt: skip
    (out_dir / "tokenizer.vocab").unlink()
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048}  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out_dir


# Llama-2-chat's template (system folded into the first user turn, BOS before every [INST]).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


TINY_RUN = dict(
    micro_batch_size=2, batch_size=4, learning_rate=5e-3, cutoff_len=64, lora_r=4, lora_alpha=8, lora_dropout=0.1,
    logging_steps=1, report_to="none", seed=7, save_steps=1000, eval_steps=1000, group_by_length="false",
    dtype="float32",
)
"""Defaults of the tests' tiny training runs (fp32, no length grouping, no checkpoints unless asked)."""


def run_flags(base, data, out, **kw) -> list[str]:
    """``--key value`` flags of a tiny training run: TINY_RUN, then ``kw``."""
    args = dict(base_model=base, data_path=data, output_dir=out, **TINY_RUN)
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]
