"""Training benchmark: our trainer vs the seed-style trainer, same work, one run, side by side.

Workload (issue "Training speed"): the embedded SmolLM2-135M base, all of
data/samples/instruct.jsonl (alpaca template, 20 held out for validation), LoRA r=8, alpha=16,
dropout 0.05 on q_proj/v_proj, cutoff 256, micro-batch 4 (batch 16), lr 3e-4, seed 42, one epoch,
fp32 weights on the CPU.

- baseline: what the seed projects do — HF ``Trainer`` + PEFT, every sample padded to the cutoff
  (``padding="max_length"``), full-vocabulary logits at every position, prompt tokens masked
  with -100 (correctly). It exists only in this file.
- ours (fp32): ``chinese-vicuna train`` with dtype float32.
- ours: ``chinese-vicuna train`` with its defaults (dynamic padding with length grouping, logits
  only where trained, fused linear + chunked cross-entropy, the kernels of train/kernels.py; bf16
  autocast where the CPU has native bf16).

Each variant runs in its own process (so peak RSS is its own). Prints one table with ratios,
the machine's measured matmul throughput and our achieved model FLOP/s against it, writes
benchmarks/results/train.json, and ends with the line ``training speedup: N.NNx``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "samples" / "instruct.jsonl"
COMMON = dict(cutoff_len=256, micro_batch_size=4, batch_size=16, learning_rate=3e-4, seed=42, val_size=20)
LORA = dict(lora_r=8, lora_alpha=16, lora_dropout=0.05, lora_target_modules=["q_proj", "v_proj"])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepared_data(tokenizer, limit: int | None):
    from chinese_vicuna.data.datasets import parse_source, prepare
    from chinese_vicuna.data.templates import get_template
    from chinese_vicuna.data.tokenize import Renderer

    renderer = Renderer(tokenizer, get_template("alpaca"), COMMON["cutoff_len"])
    data = prepare(renderer, [parse_source(str(DATA))], val_size=COMMON["val_size"], seed=COMMON["seed"],
                   max_samples=limit, progress=False)
    return data


def token_counts(samples) -> tuple[int, int]:
    real = sum(len(s.input_ids) for s in samples)
    trained = sum(sum(1 for x in s.labels[1:] if x != -100) for s in samples)
    return real, trained


def run_baseline(limit: int | None) -> dict:
    """HF Trainer + PEFT, padded to max_length, full logits (the seed projects' recipe)."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    from chinese_vicuna.model.adapters import attach_lora
    from chinese_vicuna.model.load import load_model_and_tokenizer
    from chinese_vicuna.train.loss import CausalLMLoss

    torch.manual_seed(COMMON["seed"])
    model, tok = load_model_and_tokenizer(None, dtype="float32")
    model = attach_lora(model, r=LORA["lora_r"], alpha=LORA["lora_alpha"], dropout=LORA["lora_dropout"],
                        targets=LORA["lora_target_modules"])
    data = prepared_data(tok, limit)
    n = COMMON["cutoff_len"]
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for s in data.train:  # padding="max_length": every sample becomes `cutoff` tokens
        pad = n - len(s.input_ids)
        rows["input_ids"].append(s.input_ids + [tok.pad_token_id] * pad)
        rows["attention_mask"].append([1] * len(s.input_ids) + [0] * pad)
        rows["labels"].append(s.labels + [-100] * pad)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=COMMON["micro_batch_size"],
            gradient_accumulation_steps=COMMON["batch_size"] // COMMON["micro_batch_size"], num_train_epochs=1,
            learning_rate=COMMON["learning_rate"], lr_scheduler_type="linear", logging_steps=5, save_strategy="no",
            report_to=[], seed=COMMON["seed"], use_cpu=True, dataloader_num_workers=0, disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                          data_collator=default_data_collator)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    model.eval()
    loss_fn = CausalLMLoss(model)
    total = count = 0.0
    from chinese_vicuna.data.collate import collate

    with torch.no_grad():
        for i in range(0, len(data.val), 4):
            ls, c = loss_fn(**collate(data.val[i : i + 4], tok.pad_token_id))
            total, count = total + float(ls), count + float(c)
    real, trained = token_counts(data.train)
    return {"name": "baseline (HF Trainer, pad to max_length, full logits, fp32)", "epoch_s": seconds,
            "val_loss": total / count, "real_tokens": real, "trained_tokens": trained,
            "padded_tokens": n * len(data.train), "samples": len(data.train), "peak_rss_mb": peak_rss_mb(), "precision": "fp32"}


def run_ours(limit: int | None, dtype: str) -> dict:
    from chinese_vicuna.config import load_config
    from chinese_vicuna.train.sft import run_training

    with tempfile.TemporaryDirectory() as tmp:
        args = {**COMMON, **LORA, "data_path": [str(DATA)], "template": "alpaca", "output_dir": tmp,
                "num_epochs": 1, "eval_steps": 10**9, "save_steps": 10**9, "logging_steps": 5,
                "report_to": "none", "dtype": dtype, "max_samples": limit or ""}
        flags = []
        for k, v in args.items():
            if v == "":
                continue
            flags += [f"--{k}", ",".join(v) if isinstance(v, list) else str(v)]
        trainer = run_training(load_config(None, flags))
        val = trainer.history[-1]["val_loss"]
    real, trained = token_counts(trainer.data.train)
    precision = {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(trainer.mixed_precision, "fp32")
    return {"name": f"ours ({'dtype ' + dtype if dtype != 'auto' else 'defaults'}, {precision})",
            "epoch_s": trainer.timing["train_s"], "val_loss": val, "real_tokens": real, "trained_tokens": trained,
            "padded_tokens": sum(len(s.input_ids) for s in trainer.data.train), "samples": len(trainer.data.train),
            "peak_rss_mb": peak_rss_mb(),
            "precision": precision, "config": trainer.model.config.to_dict()}


def matmul_gflops(dtype_name: str) -> float:
    """Measured dense matmul throughput on shapes like the model's (tokens x 576 @ 576 x 1536)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(5):
        a @ b
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 2 * 2048 * 576 * 1536 * 10 / (time.perf_counter() - t0) / 1e9)
    return best


def model_flops(cfg: dict, real: int, trained: int, mean_len: float) -> float:
    """FLOPs of one LoRA epoch: forward + input-gradient backward through frozen linears (4N per token),
    causal attention, and lm_head only where trained."""
    d, ff, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    linear = L * (2 * d * d + 2 * d * kv + 3 * d * ff)
    attention = L * 3 * 2 * 2 * (mean_len / 2) * d  # QK^T and AV, forward + 2x backward
    return real * (4 * linear + attention) + trained * 4 * d * cfg["vocab_size"]


def child(args) -> None:
    result = run_baseline(args.limit) if args.variant == "baseline" else run_ours(args.limit, args.variant)
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="train on at most this many samples (quick look)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    results = []
    for variant in ("baseline", "float32", "auto"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--variant", variant, "--out", out] + (
            ["--limit", str(args.limit)] if args.limit else [])
        print(f"== running {variant} ...", flush=True)
        # The workload is the CPU one of issue "Training speed" for every variant, GPU or not.
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        results.append(json.loads(Path(out).read_text()))
        os.unlink(out)
    base = results[0]
    fp32_peak, bf16_peak = matmul_gflops("float32"), matmul_gflops("bfloat16")
    print()
    print(f"{'run':<62} {'epoch s':>9} {'trained tok/s':>14} {'real tok/s':>11} {'peak RSS MB':>12} {'val loss':>9}")
    for r in results:
        r["trained_tok_s"] = r["trained_tokens"] / r["epoch_s"]
        r["real_tok_s"] = r["real_tokens"] / r["epoch_s"]
        print(f"{r['name']:<62} {r['epoch_s']:>9.1f} {r['trained_tok_s']:>14.1f} {r['real_tok_s']:>11.1f} "
              f"{r['peak_rss_mb']:>12.0f} {r['val_loss']:>9.4f}")
    print()
    for r in results[1:]:
        r["speedup"] = base["epoch_s"] / r["epoch_s"]
        r["rss_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        r["val_delta"] = r["val_loss"] - base["val_loss"]
        flops = model_flops(r["config"], r["real_tokens"], r["trained_tokens"], r["real_tokens"] / r["samples"])
        r["model_gflop_s"] = flops / r["epoch_s"] / 1e9
        peak = bf16_peak if "bf16" in r["precision"] else fp32_peak
        r["roofline_fraction"] = r["model_gflop_s"] / peak
        print(f"{r['name']}: {r['speedup']:.2f}x faster per epoch, peak memory x{r['rss_ratio']:.2f}, "
              f"val loss {r['val_delta']:+.4f} vs baseline, {r['model_gflop_s']:.0f} model GFLOP/s = "
              f"{100 * r['roofline_fraction']:.0f}% of the measured {'bf16' if 'bf16' in r['precision'] else 'fp32'} "
              f"matmul peak")
    # What fp32 alone can give: the baseline's model work (padded positions, full logits) over ours.
    ours_cfg = results[1]["config"]
    base_flops = model_flops(ours_cfg, base["padded_tokens"], base["padded_tokens"], COMMON["cutoff_len"])
    ours_flops = model_flops(ours_cfg, base["real_tokens"], base["trained_tokens"], base["real_tokens"] / base["samples"])
    base["model_gflop_s"] = base_flops / base["epoch_s"] / 1e9
    base["roofline_fraction"] = base["model_gflop_s"] / fp32_peak
    ceiling = base_flops / ours_flops * fp32_peak / base["model_gflop_s"]
    print(f"baseline: {base['model_gflop_s']:.0f} model GFLOP/s = {100 * base['roofline_fraction']:.0f}% of the fp32 peak, "
          f"doing {base_flops / ours_flops:.2f}x our model work; fp32 ceiling for ours (100% of the fp32 peak): "
          f"{ceiling:.2f}x")
    print(f"machine: matmul fp32 {fp32_peak:.0f} GFLOP/s, bf16 {bf16_peak:.0f} GFLOP/s "
          f"({os.cpu_count()} CPU threads; absolute numbers are this machine's)")
    for r in results:
        r.pop("config", None)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"results": results, "matmul_gflops": {"float32": fp32_peak, "bfloat16": bf16_peak},
                               "fp32_ceiling_speedup": ceiling,
                               "samples": args.limit or "all"}, indent=2))
    os.replace(tmp, out)
    print(f"training speedup: {results[-1]['speedup']:.2f}x")


if __name__ == "__main__":
    main()
