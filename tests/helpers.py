"""Test helpers shared by the test modules (importable as `helpers`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


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
