"""A model folder with random weights and a real shape, for memory and speed figures where the real
weights cannot be had (a GPU machine without network access, or LLaMA-7B/13B without their files).

    python benchmarks/random_model.py --shape llama-7b --out /tmp/llama-7b-random
    python benchmarks/random_model.py --like ~/.cache/chinese-vicuna/models/SmolLM2-135M-Instruct --out DIR

``--shape``: LLaMA-1's published sizes (the planner's built-in shapes: 32,000-token vocabulary, 2,048
context) with a LLaMA-style SentencePiece tokenizer trained here on the sample data (fewer pieces than
the embedding has rows, as with any tokenizer whose model pads its vocabulary). ``--like``: another
model's config and tokenizer files, new weights. Memory and time per step depend on the shape, not on
the values, so the planner and the training benchmark measure the same as with the real weights;
losses and answers mean nothing. Weights are drawn on the GPU when there is one (seconds for 7B) and
saved as bf16 safetensors.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def build(out: Path, *, shape: str | None = None, like: Path | None = None, dtype: str = "bfloat16") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    if like is not None:
        config = AutoConfig.from_pretrained(like)
        for f in like.iterdir():
            if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name != "model.safetensors.index.json":
                shutil.copy2(f, out / f.name)
    else:
        from chinese_vicuna.train.plan import KNOWN_SHAPES

        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import make_llama_sp_tokenizer  # the tests' LLaMA-style SentencePiece tokenizer

        s = KNOWN_SHAPES[shape]
        config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                             num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                             num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                             max_position_embeddings=s["context"], rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False)
        make_llama_sp_tokenizer(out, vocab_size=4000)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {type(model).__name__}, {n / 1e9:.2f}B parameters, random {dtype} weights drawn on {device} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=["llama-7b", "llama-13b", "llama-33b", "llama-65b"])
    src.add_argument("--like", type=Path, help="a model folder whose config and tokenizer are taken")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    build(args.out, shape=args.shape, like=args.like, dtype=args.dtype)


if __name__ == "__main__":
    main()
