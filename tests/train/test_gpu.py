"""The CUDA path (marked gpu; run by benchmarks/gpu_check.sh): mixed precision, QLoRA with bitsandbytes,
sdpa, checkpointing's peak against the plan, merging a QLoRA adapter, device_map=auto inference."""

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl

from chinese_vicuna.config import load_config
from chinese_vicuna.train.trainer import run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[2]


def flags(base, data, out, **kw):
    args = dict(base_model=base, data_path=data, output_dir=out, micro_batch_size=2, batch_size=4, learning_rate=1e-2,
                cutoff_len=64, lora_r=8, lora_alpha=16, logging_steps=1, report_to="none", seed=7, save_steps=1000,
                eval_steps=1000, lora_target_modules="all-linear", max_steps=20)
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def losses(out):
    with open(Path(out) / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


@pytest.mark.parametrize("dtype,mixed", [("bfloat16", "bf16"), ("float16", "fp16")])
def test_gpu_mixed_precision_training_learns(tiny_model_dir, alpaca_file, tmp_path, dtype, mixed):
    t = run_training(load_config(None, flags(tiny_model_dir, alpaca_file, tmp_path / dtype, dtype=dtype)),
                     progress_bar=False)
    assert t.accelerator.device.type == "cuda" and t.mixed_precision == mixed
    ls = losses(tmp_path / dtype)
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.3


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_gpu_qlora_training_learns(tiny_model_dir, alpaca_file, tmp_path, quant):
    t = run_training(load_config(None, flags(tiny_model_dir, alpaca_file, tmp_path / quant, quantization=quant)),
                     progress_bar=False)
    model = t.accelerator.unwrap_model(t.wrapper).model
    assert getattr(model.get_base_model(), f"is_loaded_in_{quant}")
    ls = losses(tmp_path / quant)
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.3


def test_gpu_trains_with_sdpa_equal_to_eager(tiny_model_dir):
    from chinese_vicuna.model.load import load_model

    ids = torch.randint(5, 1000, (2, 48), device="cuda")
    sdpa = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa", device="cuda")
    eager = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="eager", device="cuda")
    assert sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)


def test_gpu_checkpointing_peak_against_the_plan(tmp_path):
    """SmolLM2 LoRA at cutoff 1024, micro-batch 2, on CUDA: checkpointing cuts the peak, and the measured peak
    (reserved + context) is within 25% of the plan either way."""
    from chinese_vicuna.train.plan import measured_peak_mib

    text = (ROOT / "data" / "samples" / "pretrain.txt").read_text(encoding="utf-8").replace("\n", "")
    data = write_jsonl(tmp_path / "long.jsonl", [{"instruction": f"第{i}题", "input": "", "output": text[i * 40:][:5000]}
                                                 for i in range(4)])
    peaks = {}
    for ckpt in ("false", "true"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = run_training(load_config(None, [
            "--data_path", str(data), "--output_dir", str(tmp_path / ckpt), "--cutoff_len", "1024",
            "--micro_batch_size", "2", "--batch_size", "2", "--max_steps", "1", "--report_to", "none",
            "--gradient_checkpointing", ckpt]), progress_bar=False)
        measured, predicted = measured_peak_mib(), t.memory_plan.peak_mib
        print(f"checkpointing {ckpt}: predicted {predicted} MiB, measured {measured:.0f} MiB")
        assert abs(measured - predicted) / measured < 0.25, (ckpt, predicted, measured)
        peaks[ckpt] = measured
        del t
    assert peaks["true"] < 0.8 * peaks["false"]


def test_gpu_merge_of_a_qlora_adapter(tiny_model_dir, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.tools.merge import merge_adapters

    run_training(load_config(None, flags(tiny_model_dir, alpaca_file, tmp_path / "q", quantization="4bit")),
                 progress_bar=False)
    out = merge_adapters(str(tiny_model_dir), [str(tmp_path / "q")], tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).cuda()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    ref = PeftModel.from_pretrained(base, str(tmp_path / "q"))
    ids = torch.randint(5, 1000, (1, 32), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)
    assert json.loads((Path(out) / "chinese_vicuna.json").read_text())["template"] == "alpaca"


def test_gpu_device_map_auto_inference(tiny_model_dir):
    from chinese_vicuna.model.load import load_model

    spread = load_model(str(tiny_model_dir), dtype="float16", device_map="auto")
    # transformers 5 sets hf_device_map only when the layers land on more than one device
    placed = set(map(str, getattr(spread, "hf_device_map", {}).values())) or {str(p.device) for p in spread.parameters()}
    assert placed <= {"0", "cpu", "cuda:0"} and placed & {"0", "cuda:0"}, placed
    plain = load_model(str(tiny_model_dir), dtype="float16", device="cuda")
    ids = torch.tensor([[1, 20, 30, 40]], device="cuda")
    a = spread.generate(ids, max_new_tokens=8, do_sample=False)
    b = plain.generate(ids, max_new_tokens=8, do_sample=False)
    assert a.tolist() == b.tolist()
