"""GRPO benchmark: our trainer's ``--stage grpo`` vs TRL's ``GRPOTrainer``, same work, one run, side by side.

Workload: the embedded SmolLM2-135M-Instruct, the first ``steps x 4`` prompts of the bundled
data/samples/grpo.jsonl rendered by the alpaca template (TRL gets the rendered prompt strings), 4
completions per prompt (the group), at most ``--max-new-tokens`` tokens each, temperature 1, top-p 1,
no top-k, the ``match`` reward (the same function for both: TRL's signature), GRPO loss (std-scaled
advantages, beta 0, one iteration), LoRA r=8, alpha=16, no dropout on q_proj/v_proj, micro-batch 2
prompts (8 completions), 4 prompts (16 completions) per step, lr 1e-5, constant schedule, bf16
autocast where the CPU has native bf16 (else fp32) for both.

Timed: from the start of training (after model loading and tokenization) to the last step, sampling
included. Each variant runs in its own process (so peak RSS is its own); with ``--repeats N`` the variants run N times, alternating, and each
keeps its fastest run (``all_seconds`` lists them). TRL runs with its default
(gradient checkpointing on) unless ``--trl-no-checkpointing``. Prints a table of completions/s,
completion tokens/s, peak memory and the mean completion length of each, writes
benchmarks/results/grpo.json, and ends with ``grpo speedup: N.NNx``.
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
DATA = ROOT / "data" / "samples" / "grpo.jsonl"
COMMON = dict(G=4, micro=2, batch=4, lr=1e-5, seed=42, r=8, alpha=16, targets=["q_proj", "v_proj"], cutoff=128)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bf16() -> bool:
    from chinese_vicuna.model.load import training_precision

    return training_precision("auto", False)[0] == "bf16"


def prompt_rows(n: int) -> list[dict]:
    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [r for r in rows if "instruction" in r][:n]


def run_ours(steps: int, max_new: int) -> dict:
    from chinese_vicuna.config import load_config
    from chinese_vicuna.model.load import embedded_model_dir
    from chinese_vicuna.train.trainer import run_training

    c = COMMON
    data = Path(tempfile.mkdtemp(prefix="bench-grpo-data-")) / "p.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prompt_rows(steps * c["batch"])), encoding="utf-8")
    out = tempfile.mkdtemp(prefix="bench-grpo-")
    args = dict(
        base_model=str(embedded_model_dir()), stage="grpo", data_path=str(data), template="alpaca", output_dir=out,
        cutoff_len=c["cutoff"], micro_batch_size=c["micro"], batch_size=c["batch"], learning_rate=c["lr"],
        lr_scheduler="constant", seed=c["seed"], lora_r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0,
        lora_target_modules=",".join(c["targets"]), num_generations=c["G"], max_new_tokens=max_new, temperature=1.0,
        top_p=1.0, reward_funcs="match", grpo_loss_type="grpo", beta=0.0, max_steps=steps, logging_steps=1,
        save_steps=10**6, report_to="none", group_by_length="false",
    )
    trainer = run_training(load_config(None, [x for k, v in args.items() for x in (f"--{k}", str(v))]), progress_bar=False)
    lengths = [r["completion_length"] for r in trainer.history]
    return {"variant": "ours", "seconds": trainer.timing["train_s"], "completions": steps * c["batch"] * c["G"],
            "mean_completion_length": sum(lengths) / len(lengths), "rewards": [r["reward"] for r in trainer.history],
            "peak_rss_mb": peak_rss_mb()}


def run_trl(steps: int, max_new: int, checkpointing: bool) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from chinese_vicuna.data.formats import Conversation, Message
    from chinese_vicuna.data.templates import get_template
    from chinese_vicuna.model.load import embedded_model_dir, load_tokenizer
    from chinese_vicuna.train.rewards import match_reward

    c = COMMON
    base = str(embedded_model_dir())
    tok = load_tokenizer(base)
    template = get_template("alpaca", tok, None)
    rows = []
    for r in prompt_rows(steps * c["batch"]):
        conv = Conversation([Message("user", r["instruction"], r.get("input", ""))])
        rows.append({"prompt": "".join(s.text for s in template.segments(conv, True, tok.eos_token)), "answer": r["answer"]})
    ds = datasets.Dataset.from_list(rows)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=c["micro"] * c["G"],
        gradient_accumulation_steps=c["batch"] // c["micro"], max_steps=steps, learning_rate=c["lr"],
        lr_scheduler_type="constant", num_generations=c["G"], max_completion_length=max_new, temperature=1.0, top_p=1.0,
        top_k=0, loss_type="grpo", scale_rewards="group", beta=0.0, bf16=bf16(), use_cpu=True, logging_steps=1,
        report_to="none", save_strategy="no", seed=c["seed"], dataloader_num_workers=0, gradient_checkpointing=checkpointing,
    )
    lora = LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, target_modules=c["targets"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=match_reward, args=cfg, train_dataset=ds, processing_class=tok,
                          peft_config=lora, callbacks=[clock])  # fmt: skip
    trainer.train()
    logged = [r for r in trainer.state.log_history if "reward" in r]
    lengths = [r.get("completions/mean_length", float("nan")) for r in logged]
    name = "TRL GRPOTrainer (default: gradient checkpointing)" if checkpointing else "TRL GRPOTrainer (no checkpointing)"
    return {"variant": name, "seconds": clock.seconds, "completions": steps * c["batch"] * c["G"],
            "mean_completion_length": sum(lengths) / len(lengths), "rewards": [r["reward"] for r in logged],
            "peak_rss_mb": peak_rss_mb()}


def child(args) -> None:
    if args.variant == "ours":
        result = run_ours(args.steps, args.max_new_tokens)
    else:
        result = run_trl(args.steps, args.max_new_tokens, checkpointing=args.variant == "trl")
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps of 4 prompts x 4 completions")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--trl-no-checkpointing", action="store_true", help="also run TRL without gradient checkpointing")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the variants this many times, alternating, and keep each one's fastest run (a shared machine)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "grpo.json"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    variants = ["trl", *(["trl-no-checkpointing"] if args.trl_no_checkpointing else []), "ours"]
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for variant in variants:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                path = f.name
            cmd = [sys.executable, __file__, "--variant", variant, "--result", path, "--steps", str(args.steps),
                   "--max-new-tokens", str(args.max_new_tokens)]
            print(f"running {variant} ...", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
            r = json.loads(Path(path).read_text())
            os.unlink(path)
            r["all_seconds"] = best.get(variant, {}).get("all_seconds", []) + [r["seconds"]]
            if variant not in best or r["seconds"] < best[variant]["seconds"]:
                best[variant] = r
            best[variant]["all_seconds"] = r["all_seconds"]
    results = [best[v] for v in variants]
    import torch

    ours = results[-1]
    for r in results:
        r["completions_per_s"] = r["completions"] / r["seconds"]
        r["completion_tokens_per_s"] = r["completions"] * r["mean_completion_length"] / r["seconds"]
    fastest = max(results[:-1], key=lambda r: r["completions_per_s"])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"GRPO, SmolLM2-135M-Instruct + LoRA r8 q/v, {args.steps} steps x 4 prompts x 4 completions, at most "
          f"{args.max_new_tokens} new tokens, {'bf16 autocast' if bf16() else 'fp32'}, {torch.get_num_threads()} threads, {cpu}")
    print("| variant | completions/s | ratio | completion tokens/s | mean length | peak RSS MB |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['completions_per_s']:.2f} | {r['completions_per_s'] / fastest['completions_per_s']:.2f}x | "
              f"{r['completion_tokens_per_s']:.1f} | {r['mean_completion_length']:.1f} | {r['peak_rss_mb']:.0f} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "steps": args.steps, "max_new_tokens": args.max_new_tokens, "results": results}, indent=2))
    lowest = min(r["peak_rss_mb"] for r in results[:-1])
    print(f"peak memory: ours {ours['peak_rss_mb']:.0f} MB vs TRL's lower {lowest:.0f} MB ({ours['peak_rss_mb'] / lowest:.2f}x)")
    print(f"grpo speedup: {ours['completions_per_s'] / fastest['completions_per_s']:.2f}x")


if __name__ == "__main__":
    main()
