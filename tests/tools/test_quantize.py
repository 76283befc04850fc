"""`quantize`: a bitsandbytes 4-bit/8-bit folder that reloads pre-quantized, with identical outputs."""

import json
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama
from helpers import run_cli as cli

from chinese_vicuna.config import ConfigError
from chinese_vicuna.tools.quantize import quantize_model

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 17, 305, 4021, 9, 77, 31000, 12]])


def fresh_quantized_logits(src: Path, bits: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.model.quantize import bnb_config

    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config(f"{bits}bit", torch.float32),
                                             device_map={"": "cpu"}, dtype=torch.float32)
    with torch.no_grad():
        return q(IDS).logits


@pytest.fixture(scope="module")
def model64(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    """Hidden size 64: bitsandbytes' packed CPU inference kernel (AVX512-BF16, no grad) needs
    in_features >= its 64-weight block; the 32-wide conftest model makes it fail inside bitsandbytes."""
    d = tmp_path_factory.mktemp("tiny64")
    make_tiny_llama(len(tokenizer), hidden_size=64, intermediate_size=128).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("bits", [4, 8])
def test_reloads_prequantized_with_same_outputs(tmp_path, model64, bits):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = quantize_model(str(model64), tmp_path / "q", bits=bits)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg[f"load_in_{bits}bit"] is True
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    with safe_open(str(out / "model.safetensors"), framework="pt") as sf:
        q_proj = sf.get_tensor("model.layers.0.self_attn.q_proj.weight")
        keys = list(sf.keys())
    # stored packed: 4-bit = two weights per uint8 (64x64 -> 2048 bytes) plus the quant state; 8-bit = int8 + scales
    if bits == 4:
        assert q_proj.dtype == torch.uint8 and q_proj.numel() == 64 * 64 // 2
        assert any(k.endswith("q_proj.weight.quant_state.bitsandbytes__nf4") for k in keys)
    else:
        assert q_proj.dtype == torch.int8 and any(k.endswith("q_proj.SCB") for k in keys)
    model = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"})
    assert getattr(model, f"is_loaded_in_{bits}bit") is True
    with torch.no_grad():
        got = model(IDS).logits
    assert torch.allclose(got, fresh_quantized_logits(model64, bits), atol=1e-5, rtol=0)


def test_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        quantize_model(str(tmp_path), tmp_path / "q")
    with pytest.raises(ConfigError, match="--bits: expected 4 or 8, got 3"):
        quantize_model(str(tiny_model_dir), tmp_path / "q", bits=3)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        quantize_model(str(tiny_model_dir), tmp_path / "busy")


def test_cli_quantize(tmp_path, tiny_model_dir):
    assert "--bits {4,8}" in cli("quantize", "--help").stdout
    p = cli("quantize", "--model", tiny_model_dir, "--out", tmp_path / "q4", "--bits", "4")
    assert f"saved 4-bit bitsandbytes model to {tmp_path / 'q4'}" in p.stdout
    bad = cli("quantize", "--model", tmp_path / "none", "--out", tmp_path / "q", "--bits", "8", check=False)
    assert bad.returncode == 2 and f"error: {tmp_path / 'none'}: not a model folder (no config.json)" in bad.stderr
