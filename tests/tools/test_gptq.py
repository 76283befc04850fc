"""`chinese-vicuna quantize --method gptq`: calibration input, errors, and (where GPTQModel installs) the real thing.

GPTQModel 7.x requires torch >= 2.14.1, so the quantizing tests run in benchmarks/gpu_check.sh's fresh
environment (marked gpu); the CPU suite checks the command's input handling and its error without it.
"""

import importlib.util
import json
import math

import pytest
import torch

from chinese_vicuna.cli import main
from chinese_vicuna.config import ConfigError
from chinese_vicuna.tools.quantize import quantize_gptq, read_calibration

HAS_GPTQ = importlib.util.find_spec("gptqmodel") is not None


def test_read_calibration_formats(tmp_path):
    (tmp_path / "a.txt").write_text("第一行\n\n第二行\n", encoding="utf-8")
    assert read_calibration(tmp_path / "a.txt") == ["第一行", "第二行"]
    rows = [{"instruction": "问", "input": "", "output": "答"}, {"text": "纯文本"},
            {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert read_calibration(tmp_path / "b.jsonl") == ["问\n\n答", "纯文本", "你好\n你好！"]
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c.jsonl:2: expected text, instruction/output or conversations"):
        read_calibration(tmp_path / "c.jsonl")
    with pytest.raises(ConfigError, match="no text in it"):
        (tmp_path / "d.txt").write_text("\n\n", encoding="utf-8")
        read_calibration(tmp_path / "d.txt")


@pytest.mark.skipif(HAS_GPTQ, reason="GPTQModel is installed here")
def test_gptq_without_the_library_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "cal.txt").write_text("你好\n", encoding="utf-8")
    rc = main(["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--method", "gptq",
               "--bits", "4", "--calibration", str(tmp_path / "cal.txt")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --method gptq needs GPTQModel (No module named 'gptqmodel'): pip install gptqmodel")
    assert not (tmp_path / "q").exists()
    rc = main(["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--method", "gptq", "--bits", "4"])
    assert rc == 2 and "--method gptq needs --calibration FILE" in capsys.readouterr().err


def perplexity(model, tok, texts):
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            out = model(ids, labels=ids)
        nll += float(out.loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return math.exp(nll / n)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPTQ, reason="needs GPTQModel (torch >= 2.14.1): benchmarks/gpu_check.sh installs it")
def test_gptq_smollm2_reloads_in_transformers_close_to_fp16(tmp_path):
    """SmolLM2 quantized to 4-bit GPTQ on bundled Chinese text: transformers reloads the folder, and the
    perplexity on held-out text stays within 25% of the 16-bit model's (docs/export.md states this bound)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chinese_vicuna.model.load import resolve_base_model

    base = resolve_base_model(None)
    lines = [x for x in open("data/samples/pretrain.txt", encoding="utf-8").read().splitlines() if len(x) > 40]
    cal, held = tmp_path / "cal.txt", lines[-20:]
    cal.write_text("\n".join(lines[:128]), encoding="utf-8")
    out = quantize_gptq(base, tmp_path / "gptq", cal, bits=4, group_size=64)
    assert (out / "config.json").exists() and "quantization_config" in json.loads((out / "config.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(base)
    fp = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16 if device == "cuda" else torch.float32).to(device)
    q = AutoModelForCausalLM.from_pretrained(str(out), device_map=device)
    p_fp, p_q = perplexity(fp, tok, held), perplexity(q, tok, held)
    print(f"perplexity fp16 {p_fp:.2f}, gptq-4bit {p_q:.2f}")
    assert p_q < 1.25 * p_fp
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size < 0.5 * sum(f.stat().st_size for f in __import__("pathlib").Path(base).glob("*.safetensors"))
