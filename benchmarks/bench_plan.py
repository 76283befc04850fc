"""Memory benchmark: gradient checkpointing's saving, and the planner's prediction against the measured peak.

Workload: the embedded SmolLM2-135M base, long samples (every sample reaches cutoff_len), micro-batch 2,
one optimizer step of 2 samples, LoRA r=8 on
q_proj/v_proj and QLoRA (bitsandbytes NF4), cutoff 256 and 2048, gradient checkpointing off and on,
the trainer's defaults otherwise (bf16 autocast where the CPU has native bf16).

Each run is its own ``chinese-vicuna train`` process and reports its own peak RSS (``ru_maxrss``),
so other jobs on the machine do not enter the measurement (they only slow it down). The trainer
prints ``memory: predicted peak N MiB, measured M MiB``; this script collects those lines.

Prints one table, writes benchmarks/results/plan.json (plan-cuda.json on a GPU), and the lines
``gradient checkpointing: ...`` and ``planner accuracy: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"memory: predicted peak (\d+) MiB, measured (\d+) MiB")


def long_data(path: Path, n: int = 8) -> Path:
    """Alpaca records whose replies run past 2048 tokens (truncated to cutoff_len by the trainer)."""
    text = (ROOT / "data" / "samples" / "pretrain.txt").read_text(encoding="utf-8").replace("\n", "")
    rows = []
    for i in range(n):
        reply = (text[i * 50 :] + text) * 3
        rows.append({"instruction": f"第{i}题：请复述下面的文字。", "input": "", "output": reply[:6000]})
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def mixed_data(path: Path, n: int = 48) -> Path:
    """Alpaca records of mixed lengths, from a few dozen tokens to past 2048 (as real chat data is): every
    micro-batch pads to another length, so every step allocates tensors of new shapes."""
    text = (ROOT / "data" / "samples" / "pretrain.txt").read_text(encoding="utf-8").replace("\n", "")
    rows = []
    for i in range(n):
        size = 40 + (i * 397) % 3200  # characters: roughly 30 to 2,400 tokens
        reply = ((text[i * 37 :] + text) * 3)[:size]
        rows.append({"instruction": f"第{i}题：请复述下面的文字。", "input": "", "output": reply})
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def run(data: Path, out: Path, cutoff: int, ckpt: bool, quant: str, model: str | None = None,
        micro_batch: int = 2, steps: int = 1, name: str = "long") -> dict:
    cmd = [sys.executable, "-m", "chinese_vicuna", "train", "--data_path", str(data), "--output_dir", str(out),
           "--cutoff_len", str(cutoff), "--micro_batch_size", str(micro_batch), "--batch_size", str(micro_batch),
           "--max_steps", str(steps), "--gradient_checkpointing", "true" if ckpt else "false", "--quantization", quant,
           "--report_to", "none", "--save_steps", "1000", "--logging_steps", "1", "--seed", "42"]
    cmd += ["--base_model", model] if model else []
    return measure(cmd, dict(workload=name, cutoff=cutoff, checkpointing=ckpt, quantization=quant,
                             micro_batch_size=micro_batch, steps=steps))


def run_demo(out: Path) -> dict:
    """``make demo``'s training run as it is (configs/demo.yaml), into a scratch folder."""
    cmd = [sys.executable, "-m", "chinese_vicuna", "train", str(ROOT / "configs" / "demo.yaml"),
           "--output_dir", str(out), "--report_to", "none"]
    return measure(cmd, dict(workload="demo", cutoff=256, checkpointing=False, quantization="none",
                             micro_batch_size=8, steps=None))


def measure(cmd: list[str], row: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    m = LINE.search(proc.stdout)
    if not m:
        raise SystemExit(f"no memory line in the output of {' '.join(cmd)}:\n{proc.stdout[-2000:]}")
    predicted, measured = int(m.group(1)), int(m.group(2))
    ckpt = re.search(r"gradient checkpointing (on|off)", proc.stdout)
    if ckpt:  # the demo's `auto` decides by the plan
        row["checkpointing"] = ckpt.group(1) == "on"
    return dict(row, predicted_mib=predicted, measured_mib=measured, error=(predicted - measured) / measured,
                seconds=round(time.perf_counter() - start, 1))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


QUANT_NAMES = {"none": "LoRA", "8bit": "LoRA 8-bit", "4bit": "QLoRA"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="cutoff 256 and 1024 only (minutes less)")
    ap.add_argument("--model", help="another base model folder (default: the embedded SmolLM2); "
                                    "benchmarks/random_model.py makes LLaMA-7B/13B-shaped ones")
    ap.add_argument("--quantization", default="none,4bit", help="comma list of none, 8bit, 4bit")
    ap.add_argument("--cutoffs", help="comma list (default 256,2048; 256,1024 with --quick)")
    ap.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    ap.add_argument("--micro-batch", default="2",
                    help="micro-batch size, or CUTOFF:SIZE pairs (e.g. 256:4,2048:2, as the README's LLaMA table)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each is its own process and measures its own peak)")
    ap.add_argument("--json", type=Path, help="results file (default benchmarks/results/plan[-cuda].json)")
    ap.add_argument("--workloads", default=None,
                    help="comma list of grid (long samples, the table above), mixed (mixed lengths up to cutoff 2048, "
                         "4 steps, checkpointing off and on), demo (configs/demo.yaml as `make demo` runs it); "
                         "default: all three on the embedded model, grid alone with --model")
    args = ap.parse_args()
    workloads = (args.workloads or ("grid" if args.model else "grid,mixed,demo")).split(",")
    cutoffs = tuple(int(c) for c in args.cutoffs.split(",")) if args.cutoffs else (256, 1024) if args.quick else (256, 2048)
    micro = dict((int(a), int(b)) for a, b in (p.split(":") for p in args.micro_batch.split(","))) \
        if ":" in args.micro_batch else {c: int(args.micro_batch) for c in cutoffs}
    ckpts = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    grid = [(q, c, k) for q in args.quantization.split(",") for c in cutoffs for k in ckpts] if "grid" in workloads else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        data = long_data(Path(tmp) / "long.jsonl")
        futures = [pool.submit(run, data, Path(tmp) / f"{q}-{c}-{k}", c, k, q, args.model, micro[c]) for q, c, k in grid]
        if "mixed" in workloads:
            mixed = mixed_data(Path(tmp) / "mixed.jsonl")
            futures += [pool.submit(run, mixed, Path(tmp) / f"mixed-{k}", 2048, k, "none", args.model, 2, 4, "mixed")
                        for k in (False, True)]
        if "demo" in workloads:
            futures.append(pool.submit(run_demo, Path(tmp) / "demo"))
        for f in futures:
            r = f.result()
            rows.append(r)
            print(f"{r['workload']:<5} {QUANT_NAMES[r['quantization']]:<10} cutoff {r['cutoff']:>5}  micro-batch {r['micro_batch_size']}  "
                  f"checkpointing {'on ' if r['checkpointing'] else 'off'}  predicted {r['predicted_mib']:>6} MiB  "
                  f"measured {r['measured_mib']:>6} MiB  error {r['error']:+6.1%}  ({r['seconds']} s)", flush=True)

    import torch

    from chinese_vicuna.model.load import cpu_has_native_bf16
    from chinese_vicuna.train.heap import find_jemalloc

    machine = (f"{cpu_name()}, {'native bf16 (bf16 autocast)' if cpu_has_native_bf16() else 'no native bf16 (fp32)'}, "
               f"{os.cpu_count()} cores, torch {torch.__version__}, allocator "
               f"{'jemalloc' if find_jemalloc() else 'glibc'}")
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name() + ", " + machine
    model = args.model or "SmolLM2-135M-Instruct (embedded)"
    dtype = "cuda" if torch.cuda.is_available() else ("bfloat16" if cpu_has_native_bf16() else "float32")
    for r in rows:
        r.setdefault("dtype", dtype)  # what `auto` chose: the planner test replays the runs with it
    result = dict(machine=machine, model=model, runs=rows)
    out = args.json or ROOT / "benchmarks" / "results" / ("plan-cuda.json" if torch.cuda.is_available() else "plan.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_out, out)
    big = max(cutoffs)
    off = next((r for r in rows if r["workload"] == "long" and r["cutoff"] == big and not r["checkpointing"]), None)
    on = next((r for r in rows if r["workload"] == "long" and r["cutoff"] == big and r["checkpointing"]
               and r["quantization"] == off["quantization"]),
              None) if off else None
    if off and on:
        print(f"gradient checkpointing: peak {off['measured_mib']} MiB -> {on['measured_mib']} MiB "
              f"({on['measured_mib'] / off['measured_mib'] - 1:+.0%}; {QUANT_NAMES[off['quantization']]}, cutoff {big}, "
              f"micro-batch {off['micro_batch_size']}, {'peak reserved + context' if torch.cuda.is_available() else 'peak RSS'})")
    worst = max(abs(r["error"]) for r in rows)
    print(f"planner accuracy: worst error {worst:.1%} over {len(rows)} runs (target 15%; {model}; "
          f"workloads {', '.join(workloads)}; grid: {', '.join(QUANT_NAMES[q] for q in args.quantization.split(','))}, "
          f"cutoff {' and '.join(map(str, cutoffs))}, checkpointing {args.checkpointing})")


if __name__ == "__main__":
    main()
