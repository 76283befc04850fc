"""DPO benchmark: our trainer's ``--stage dpo`` vs TRL's ``DPOTrainer``, same work, one run, side by side.

Workload: the embedded SmolLM2-135M base, the bundled data/samples/preference.jsonl pairs (alpaca
template), LoRA r=8, alpha=16, no dropout (TRL disables dropout for DPO) on q_proj/v_proj, beta 0.1,
sigmoid loss, cutoff/max_length 256, micro-batch 4, batch 8, lr 1e-4, constant schedule,
``--steps`` optimizer steps, bf16 autocast where the CPU has native bf16 (else fp32) for both.

Both trainers see the same pairs in the same micro-batches: TRL gets the prompts rendered by our
template (``prompt``/``chosen``/``rejected`` strings) in our batch order with a sequential sampler.
Timed: from the start of training (after model loading and tokenization) to the last step,
including our reference log-prob pass (TRL runs its reference forward inside each step).

TRL runs twice: with its default gradient checkpointing and without it (faster, more memory); the
ratios are against the faster of the two. Each variant runs in its own process (so peak RSS is its
own). Prints a table with pairs/s, peak memory and the mean loss over the steps of each, writes benchmarks/results/pref.json, and ends
with ``dpo speedup: N.NNx``.
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
DATA = ROOT / "data" / "samples" / "preference.jsonl"
COMMON = dict(cutoff=256, micro=4, batch=8, lr=1e-4, beta=0.1, seed=42, r=8, alpha=16, targets=["q_proj", "v_proj"])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bf16() -> bool:
    from chinese_vicuna.model.load import training_precision

    return training_precision("auto", False)[0] == "bf16"


def batch_order(n: int, steps: int) -> list[int]:
    """Our trainer's micro-batch plan for epoch 0 (no length grouping), flattened: what TRL is fed."""
    from chinese_vicuna.data.collate import plan_batches
    from chinese_vicuna.data.datasets import split

    records = split(list(range(n)), 0.0, COMMON["seed"])[0]  # the trainer's seeded shuffle of the records
    plan = plan_batches([1] * n, COMMON["micro"], COMMON["seed"], 0, group_by_length=False)
    need = steps * COMMON["batch"] // COMMON["micro"]
    return [records[i] for mb in plan[:need] for i in mb]


def run_ours(steps: int) -> dict:
    from chinese_vicuna.config import load_config
    from chinese_vicuna.train import preference
    from chinese_vicuna.train.trainer import run_training

    timing = {}
    prepare = preference.PreferenceObjective.prepare

    def timed(self):
        t = time.perf_counter()
        prepare(self)
        timing["reference_s"] = time.perf_counter() - t

    preference.PreferenceObjective.prepare = timed
    out = tempfile.mkdtemp(prefix="bench-pref-")
    c = COMMON
    args = dict(
        stage="dpo", data_path=str(DATA), template="alpaca", output_dir=out, cutoff_len=c["cutoff"],
        micro_batch_size=c["micro"], batch_size=c["batch"], learning_rate=c["lr"], lr_scheduler="constant",
        seed=c["seed"], lora_r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, lora_target_modules=",".join(c["targets"]),
        pref_beta=c["beta"], max_steps=steps, logging_steps=1, save_steps=10**6, report_to="none", group_by_length="false",
    )
    trainer = run_training(load_config(None, [x for k, v in args.items() for x in (f"--{k}", str(v))]), progress_bar=False)
    seconds = trainer.timing["train_s"] + timing["reference_s"]
    losses = [r["loss"] for r in trainer.history]
    first = trainer.history[0]
    return {"variant": "ours", "step1_logps": [first["logps/chosen"], first["logps/rejected"]], "seconds": seconds, "reference_s": timing["reference_s"], "pairs": steps * c["batch"],
            "losses": losses, "peak_rss_mb": peak_rss_mb(), "n_pairs": len(trainer.data.train)}


def run_trl(steps: int, checkpointing: bool) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from chinese_vicuna.data.datasets import Source
    from chinese_vicuna.data.formats import Conversation
    from chinese_vicuna.data.preference import load_preferences
    from chinese_vicuna.data.templates import get_template
    from chinese_vicuna.model.load import load_tokenizer, resolve_base_model

    c = COMMON
    base = resolve_base_model(None)
    tok = load_tokenizer(base)
    template = get_template("alpaca", tok, None)
    records = load_preferences([Source(str(DATA))], "dpo").records
    rows = []
    for p in records:
        prompt = "".join(s.text for s in template.segments(Conversation(list(p.prompt)), True, tok.eos_token))
        rows.append({"prompt": prompt, "chosen": p.chosen, "rejected": p.rejected})
    order = batch_order(len(rows), steps)
    ds = datasets.Dataset.from_list([rows[i] for i in order])

    class Sequential(DPOTrainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    use_bf16 = bf16()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=c["micro"],
        gradient_accumulation_steps=c["batch"] // c["micro"], max_steps=steps, learning_rate=c["lr"],
        lr_scheduler_type="constant", beta=c["beta"], max_length=c["cutoff"], bf16=use_bf16, use_cpu=True,
        logging_steps=1, report_to="none", save_strategy="no", seed=c["seed"], dataloader_num_workers=0,
        gradient_checkpointing=checkpointing,  # TRL's default is on: it trades speed for memory
    )
    lora = LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, target_modules=c["targets"], task_type="CAUSAL_LM")
    trainer = Sequential(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[clock])
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    losses = [r["loss"] for r in logged]
    name = "TRL DPOTrainer (default: gradient checkpointing)" if checkpointing else "TRL DPOTrainer (no checkpointing)"
    return {"variant": name, "step1_logps": [logged[0].get("logps/chosen"), logged[0].get("logps/rejected")], "seconds": clock.seconds, "pairs": steps * c["batch"], "losses": losses,
            "peak_rss_mb": peak_rss_mb(), "n_pairs": len(rows)}


def child(args) -> None:
    if args.variant == "ours":
        result = run_ours(args.steps)
    else:
        result = run_trl(args.steps, checkpointing=args.variant == "trl")
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps of 8 pairs")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "pref.json"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    results = []
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    for variant in ("trl", "trl-no-checkpointing", "ours"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, __file__, "--variant", variant, "--result", path, "--steps", str(args.steps)]
        print(f"running {variant} ...", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        results.append(json.loads(Path(path).read_text()))
        os.unlink(path)
    import torch

    ours = results[-1]
    for r in results:
        r["pairs_per_s"] = r["pairs"] / r["seconds"]
        r["mean_loss"] = sum(r["losses"]) / len(r["losses"])
    fastest = max(results[:-1], key=lambda r: r["pairs_per_s"])  # ratios against TRL's faster setting
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"DPO, SmolLM2-135M + LoRA r8 q/v, {args.steps} steps x 8 pairs, cutoff 256, "
          f"{'bf16 autocast' if bf16() else 'fp32'}, {torch.get_num_threads()} threads, {cpu}")
    print("| variant | pairs/s | ratio | peak RSS MB | mean loss | first/last loss |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['pairs_per_s']:.2f} | {r['pairs_per_s'] / fastest['pairs_per_s']:.2f}x | "
              f"{r['peak_rss_mb']:.0f} | {r['mean_loss']:.4f} | {r['losses'][0]:.4f} / {r['losses'][-1]:.4f} |")
    print("step 1, mean log-probs of the same 8 pairs before any update (chosen / rejected): "
          + "; ".join(f"{r['variant']}: {r['step1_logps'][0]:.2f} / {r['step1_logps'][1]:.2f}" for r in results))
    print("(both run a reference forward for each pair they train on: TRL inside each step, ours when the pair is "
          "first collated, kept for later epochs)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "steps": args.steps, "results": results}, indent=2))
    lowest = min(r["peak_rss_mb"] for r in results[:-1])
    print(f"peak memory: ours {ours['peak_rss_mb']:.0f} MB vs TRL's lower {lowest:.0f} MB ({ours['peak_rss_mb'] / lowest:.2f}x)")
    print(f"dpo speedup: {ours['pairs_per_s'] / fastest['pairs_per_s']:.2f}x")


if __name__ == "__main__":
    main()
