"""Multiple-choice evaluation speed: one question at a time vs batched with a shared-prefix KV cache.

Workload: the embedded SmolLM2-135M-Instruct on the bundled C-Eval sample (val split, 3 subjects,
36 questions), 5-shot, letters scored from logits. Variants, each over the same questions:

- ``one at a time``: one forward pass per question over its whole prompt (the seeds' loop);
- ``batched``: ``--batch-size`` questions per forward pass, left-padded;
- ``batched + prefix cache``: the same, after one pass over the subject's shared header and
  examples whose KV cache every batch reuses (the default of ``eval ceval`` / ``eval cmmlu``).

Every variant must give the same predictions. Prints a table of questions/s with ratios, writes
benchmarks/results/eval.json and ends with ``eval speedup (batched + prefix cache vs one at a time): N.NNx``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_variant(model, tok, bench, data: Path, shots: int, batch_size: int, cache: bool):
    from chinese_vicuna.eval.benchmarks import predict

    preds, n = [], 0
    start = time.perf_counter()
    for subject in bench.discover(data, "val"):
        questions = bench.read(data, "val", subject)
        examples = bench.examples(data, subject, shots)
        p, _ = predict(model, tok, bench, subject, questions, examples, batch_size=batch_size, prefix_cache=cache)
        preds += p
        n += len(questions)
    return n / (time.perf_counter() - start), preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs per variant")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "eval.json"))
    args = ap.parse_args()

    import torch

    from chinese_vicuna.eval.ceval import CEVAL
    from chinese_vicuna.model.adapters import load_for_inference

    data = ROOT / "data" / "samples" / "ceval"
    model, tok, _ = load_for_inference(None, [], device_map=None)
    model.eval()
    variants = [("one at a time", 1, False), ("batched", args.batch_size, False),
                ("batched + prefix cache", args.batch_size, True)]  # fmt: skip
    warm = CEVAL.read(data, "val", "computer_network")[:2]
    from chinese_vicuna.eval.benchmarks import predict

    predict(model, tok, CEVAL, "computer_network", warm, CEVAL.examples(data, "computer_network", args.shots))
    rows, reference = [], None
    for name, bs, cache in variants:
        best, preds = 0.0, None
        for _ in range(args.repeats):
            qps, preds = run_variant(model, tok, CEVAL, data, args.shots, bs, cache)
            best = max(best, qps)
        if reference is None:
            reference = preds
        elif preds != reference:
            raise SystemExit(f"{name}: predictions differ from one at a time")
        rows.append({"variant": name, "batch_size": bs, "prefix_cache": cache, "questions_per_s": best})
    base = rows[0]["questions_per_s"]
    print(f"C-Eval sample val, {len(reference)} questions, {args.shots}-shot, SmolLM2-135M, "
          f"{torch.get_num_threads()} threads, same predictions in every variant")  # fmt: skip
    print("| variant | questions/s | ratio |\n|---|---|---|")
    for r in rows:
        r["ratio"] = r["questions_per_s"] / base
        print(f"| {r['variant']} (batch {r['batch_size']}) | {r['questions_per_s']:.2f} | {r['ratio']:.2f}x |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"shots": args.shots, "questions": len(reference), "rows": rows}, indent=2))
    os.replace(tmp, out)
    print(f"eval speedup (batched + prefix cache vs one at a time): {rows[-1]['ratio']:.2f}x")


if __name__ == "__main__":
    main()
