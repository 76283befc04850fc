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


def peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def run_baseline(limit: int | None, quantization: str = "none") -> dict:
    """HF Trainer + PEFT, padded to max_length, full logits (the seed projects' recipe).

    On the CPU: fp32. On a GPU: the Trainer's bf16 (fp16 without bf16) mixed precision, as the seed
    projects run it, and with ``quantization="4bit"`` QLoRA through bitsandbytes.
    """
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from chinese_vicuna.model.adapters import attach_lora
    from chinese_vicuna.model.load import load_model_and_tokenizer
    from chinese_vicuna.train.loss import CausalLMLoss

    torch.manual_seed(COMMON["seed"])
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    # QLoRA: 4-bit weights computing in the GPU's half precision; otherwise fp32 weights (+ Trainer amp on GPU)
    half = "bfloat16" if bf16 else "float16" if cuda else "float32"
    model, tok = load_model_and_tokenizer(None, dtype=half if quantization != "none" else "float32",
                                          quantization=quantization)
    if quantization != "none":
        from chinese_vicuna.model.quantize import prepare_for_kbit_training

        model = prepare_for_kbit_training(model)
    model = attach_lora(model, r=LORA["lora_r"], alpha=LORA["lora_alpha"], dropout=LORA["lora_dropout"],
                        targets=LORA["lora_target_modules"])
    data = prepared_data(tok, limit)
    n = COMMON["cutoff_len"]
    rows = []  # the Trainer takes any sized dataset: a list of feature dicts
    for s in data.train:  # padding="max_length": every sample becomes `cutoff` tokens
        pad = n - len(s.input_ids)
        rows.append({"input_ids": s.input_ids + [tok.pad_token_id] * pad,
                     "attention_mask": [1] * len(s.input_ids) + [0] * pad, "labels": s.labels + [-100] * pad})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=COMMON["micro_batch_size"],
            gradient_accumulation_steps=COMMON["batch_size"] // COMMON["micro_batch_size"], num_train_epochs=1,
            learning_rate=COMMON["learning_rate"], lr_scheduler_type="linear", logging_steps=5, save_strategy="no",
            report_to=[], seed=COMMON["seed"], use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=False,
            bf16=bf16, fp16=cuda and not bf16,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows,
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
            batch = {k: v.to(model.device) for k, v in collate(data.val[i : i + 4], tok.pad_token_id).items()}
            ls, c = loss_fn(**batch)
            total, count = total + float(ls), count + float(c)
    real, trained = token_counts(data.train)
    precision = ("bf16 autocast" if bf16 else "fp16 autocast") if cuda else "fp32"
    q = ", QLoRA 4-bit" if quantization == "4bit" else ""
    return {"name": f"baseline (HF Trainer, pad to max_length, full logits, {precision}{q})", "epoch_s": seconds,
            "val_loss": total / count, "real_tokens": real, "trained_tokens": trained,
            "padded_tokens": n * len(data.train), "samples": len(data.train), "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(), "precision": precision, "quantization": quantization}


def run_ours(limit: int | None, dtype: str, quantization: str = "none") -> dict:
    from chinese_vicuna.config import load_config
    from chinese_vicuna.train.trainer import run_training

    with tempfile.TemporaryDirectory() as tmp:
        args = {**COMMON, **LORA, "data_path": [str(DATA)], "template": "alpaca", "output_dir": tmp,
                "num_epochs": 1, "eval_steps": 10**9, "save_steps": 10**9, "logging_steps": 5,
                "report_to": "none", "dtype": dtype, "max_samples": limit or "", "quantization": quantization}
        flags = []
        for k, v in args.items():
            if v == "":
                continue
            flags += [f"--{k}", ",".join(v) if isinstance(v, list) else str(v)]
        trainer = run_training(load_config(None, flags))
        val = trainer.history[-1]["val_loss"]
    real, trained = token_counts(trainer.data.train)
    precision = {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(trainer.mixed_precision, "fp32")
    q = ", QLoRA 4-bit" if quantization == "4bit" else ""
    return {"name": f"ours ({'dtype ' + dtype if dtype != 'auto' else 'defaults'}, {precision}{q})",
            "epoch_s": trainer.timing["train_s"], "val_loss": val, "real_tokens": real, "trained_tokens": trained,
            "padded_tokens": sum(len(s.input_ids) for s in trainer.data.train), "samples": len(trainer.data.train),
            "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(), "quantization": quantization,
            "precision": precision, "config": trainer.model.config.to_dict()}


def matmul_gflops(dtype_name: str, device: str = "cpu") -> float:
    """Measured dense matmul throughput on shapes like the model's (tokens x 576 @ 576 x 1536)."""
    import torch

    dtype = getattr(torch, dtype_name)
    m = 2048 if device == "cpu" else 16384
    a, b = torch.randn(m, 576, dtype=dtype, device=device), torch.randn(576, 1536, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(5):
        a @ b
    best = 0.0
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = max(best, 2 * m * 576 * 1536 * 10 / (time.perf_counter() - t0) / 1e9)
    return best


def model_flops(cfg: dict, real: int, trained: int, mean_len: float) -> float:
    """FLOPs of one LoRA epoch: forward + input-gradient backward through frozen linears (4N per token),
    causal attention, and lm_head only where trained."""
    d, ff, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    linear = L * (2 * d * d + 2 * d * kv + 3 * d * ff)
    attention = L * 3 * 2 * 2 * (mean_len / 2) * d  # QK^T and AV, forward + 2x backward
    return real * (4 * linear + attention) + trained * 4 * d * cfg["vocab_size"]


VARIANTS = {  # name: (runner, arguments)
    "baseline": ("baseline", {}),
    "baseline-4bit": ("baseline", {"quantization": "4bit"}),
    "float32": ("ours", {"dtype": "float32"}),
    "auto": ("ours", {"dtype": "auto"}),
    "4bit": ("ours", {"dtype": "auto", "quantization": "4bit"}),
}
CPU_VARIANTS = ("baseline", "float32", "auto")
GPU_VARIANTS = ("baseline", "auto", "baseline-4bit", "4bit")


def child(args) -> None:
    runner, kwargs = VARIANTS[args.variant]
    result = run_baseline(args.limit, **kwargs) if runner == "baseline" else run_ours(args.limit, **kwargs)
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="train on at most this many samples (quick look)")
    ap.add_argument("--json", default=None, help="results file (default benchmarks/results/train[-cuda].json)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: the issue's fp32 CPU workload (GPUs hidden); cuda: bf16/fp16 and QLoRA 4-bit on the GPU")
    ap.add_argument("--variants", default=None, help=f"comma list from {', '.join(VARIANTS)} (first = reference)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    variants = args.variants.split(",") if args.variants else list(CPU_VARIANTS if args.device == "cpu" else GPU_VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU workload for every variant, GPU or not
    results = []
    for variant in variants:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--variant", variant, "--out", out] + (
            ["--limit", str(args.limit)] if args.limit else [])
        print(f"== running {variant} ...", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        results.append(json.loads(Path(out).read_text()) | {"variant": variant})
        os.unlink(out)
    summarize(results, args)


def summarize(results: list[dict], args) -> None:
    device = args.device
    fp32_peak, bf16_peak = matmul_gflops("float32", device), matmul_gflops("bfloat16", device)
    gpu = device == "cuda"
    print()
    mem_head = "peak GPU MB" if gpu else "peak RSS MB"
    print(f"{'run':<70} {'epoch s':>9} {'trained tok/s':>14} {'real tok/s':>11} {mem_head:>12} {'val loss':>9}")
    for r in results:
        r["trained_tok_s"] = r["trained_tokens"] / r["epoch_s"]
        r["real_tok_s"] = r["real_tokens"] / r["epoch_s"]
        r["peak_mb"] = r["peak_gpu_mb"] if gpu else r["peak_rss_mb"]
        print(f"{r['name']:<70} {r['epoch_s']:>9.1f} {r['trained_tok_s']:>14.1f} {r['real_tok_s']:>11.1f} "
              f"{r['peak_mb']:>12.0f} {r['val_loss']:>9.4f}")
    print()
    baselines = {r.get("quantization", "none"): r for r in results if r["variant"].startswith("baseline")}
    reference = results[0]
    for r in results:
        if r["variant"].startswith("baseline"):
            continue
        base = baselines.get(r.get("quantization", "none"), reference)
        r["baseline"] = base["variant"]
        r["speedup"] = base["epoch_s"] / r["epoch_s"]
        r["memory_ratio"] = r["peak_mb"] / base["peak_mb"]
        r["rss_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        r["val_delta"] = r["val_loss"] - base["val_loss"]
        flops = model_flops(r["config"], r["real_tokens"], r["trained_tokens"], r["real_tokens"] / r["samples"])
        r["model_gflop_s"] = flops / r["epoch_s"] / 1e9
        low = "bf16" in r["precision"] or "fp16" in r["precision"]
        r["roofline_fraction"] = r["model_gflop_s"] / (bf16_peak if low else fp32_peak)
        print(f"{r['name']}: {r['speedup']:.2f}x faster per epoch than {base['variant']}, peak memory "
              f"x{r['memory_ratio']:.2f}, val loss {r['val_delta']:+.4f}, {r['model_gflop_s']:.0f} model GFLOP/s = "
              f"{100 * r['roofline_fraction']:.0f}% of the measured {'bf16' if low else 'fp32'} matmul peak")
    extra = {}
    ours_fp32 = next((r for r in results if r["variant"] == "float32"), None)
    base = baselines.get("none")
    if ours_fp32 and base and base["precision"] == "fp32":
        # What fp32 alone can give: the baseline's model work (padded positions, full logits) over ours.
        cfg = ours_fp32["config"]
        base_flops = model_flops(cfg, base["padded_tokens"], base["padded_tokens"], COMMON["cutoff_len"])
        ours_flops = model_flops(cfg, base["real_tokens"], base["trained_tokens"], base["real_tokens"] / base["samples"])
        base["model_gflop_s"] = base_flops / base["epoch_s"] / 1e9
        base["roofline_fraction"] = base["model_gflop_s"] / fp32_peak
        extra["fp32_ceiling_speedup"] = base_flops / ours_flops * fp32_peak / base["model_gflop_s"]
        print(f"baseline: {base['model_gflop_s']:.0f} model GFLOP/s = {100 * base['roofline_fraction']:.0f}% of the "
              f"fp32 peak, doing {base_flops / ours_flops:.2f}x our model work; fp32 ceiling for ours (100% of the "
              f"fp32 peak): {extra['fp32_ceiling_speedup']:.2f}x")
    import torch

    where = torch.cuda.get_device_name() if gpu else f"{os.cpu_count()} CPU threads"
    print(f"machine: matmul fp32 {fp32_peak:.0f} GFLOP/s, bf16 {bf16_peak:.0f} GFLOP/s "
          f"({where}; absolute numbers are this machine's)")
    for r in results:
        r.pop("config", None)
    out = Path(args.json or ROOT / "benchmarks" / "results" / ("train.json" if not gpu else "train-cuda.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"results": results, "device": where,
                               "matmul_gflops": {"float32": fp32_peak, "bfloat16": bf16_peak},
                               **extra, "samples": args.limit or "all"}, indent=2))
    os.replace(tmp, out)
    default = next((r for r in results if r["variant"] == "auto"), results[-1])
    print(f"training speedup: {default['speedup']:.2f}x")


if __name__ == "__main__":
    main()
