"""Inference benchmark: HF ``generate`` vs our streaming iterator vs llama.cpp (Q8_0, Q4_K_M).

Workload: the embedded SmolLM2-135M-Instruct, three short Chinese prompts in its chat template,
64 new tokens, greedy (repetition penalty 1.0), batch 1, every engine given the same prompt ids.
The llama.cpp files are exported first with ``export_gguf`` into a temporary folder.

Per engine: time to first token (TTFT: first generated token for ``generate``, first text delta
for the streaming engines) and tokens/s (generated tokens / wall time of the whole reply),
averaged over the prompts after one warm-up reply. Prints a table with ratios to HF ``generate``,
writes benchmarks/results/infer.json and ends with the line
``inference speedup (llama.cpp q8_0 vs HF generate): N.NNx``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["请介绍一下北京的历史。", "天空为什么是蓝色的？", "写一首关于春天的短诗。"]
NEW_TOKENS = 64


class _FirstToken:
    """A ``generate`` streamer that records when the first new token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def _measure(reply: Callable[[list[int]], tuple[float, int]], prompts: list[list[int]]) -> dict:
    """Run ``reply`` (-> time of first token, tokens generated) on every prompt after one warm-up."""
    reply(prompts[0])  # warm-up: first-call allocations, thread pools, caches
    ttfts, rates = [], []
    for ids in prompts:
        t0 = time.perf_counter()
        first, n = reply(ids)
        total = time.perf_counter() - t0
        ttfts.append((first - t0) * 1000)
        rates.append(n / total)
    return {"ttft_ms": statistics.mean(ttfts), "tokens_per_s": statistics.mean(rates)}


def _consume(stream: Iterator[str], pieces: list[str] | None = None) -> float:
    """Drain a text stream; return when its first non-empty delta arrived."""
    first = None
    for delta in stream:
        if first is None and delta:
            first = time.perf_counter()
        if pieces is not None:
            pieces.append(delta)
    return first if first is not None else time.perf_counter()


def run(out_json: str | None = str(ROOT / "benchmarks" / "results" / "infer.json"), threads: int | None = None) -> list[dict]:
    """Measure every engine; print the table; write ``out_json`` (if given); return the rows.

    ``threads`` (default: every core this process may use) is given to torch and llama.cpp alike.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.generation.decode import GenArgs
    from chinese_vicuna.generation.llamacpp import LlamaCppBackend
    from chinese_vicuna.model.load import load_tokenizer, resolve_base_model
    from chinese_vicuna.tools.gguf import export_gguf

    base = resolve_base_model(None)
    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    gen = GenArgs(max_new_tokens=NEW_TOKENS, repetition_penalty=1.0)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
               for p in PROMPTS]
    prompt_ids = [tok(p).input_ids for p in prompts]
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    rows = []

    @torch.no_grad()
    def hf_generate(ids):
        streamer = _FirstToken()
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer, pad_token_id=tok.pad_token_id)
        return streamer.first, out.shape[1] - len(ids)

    rows.append({"engine": "HF model.generate (fp32)", **_measure(hf_generate, prompt_ids)})

    from chinese_vicuna.generation.decode import TextStream

    name = "ours: streaming token iterator (TextStream, fp32)"

    def ours(ids):
        stream = TextStream(model, tok, ids, gen)
        return _consume(iter(stream)), stream.completion_tokens

    with torch.no_grad():
        rows.append({"engine": name, **_measure(ours, prompt_ids)})

    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        for kind in ("q8_0", "q4_k_m"):
            path = export_gguf(base, Path(tmp) / f"smollm2-{kind}.gguf", gguf_type=kind)
            size_mb = path.stat().st_size / 2**20
            with LlamaCppBackend(path, n_ctx=512, n_threads=threads) as backend:
                def llama(ids, backend=backend):
                    first = _consume(backend.stream(ids, gen))
                    return first, backend.completion_tokens

                rows.append({"engine": f"llama.cpp {kind.upper()} ({size_mb:.0f} MiB)", **_measure(llama, prompt_ids)})

    ref = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_hf_generate"] = r["tokens_per_s"] / ref
    print(f"SmolLM2-135M-Instruct, {len(PROMPTS)} Chinese prompts, {NEW_TOKENS} new tokens, greedy, "
          f"batch 1, {threads} CPU threads")
    print(f"{'engine':<42} {'TTFT ms':>9} {'tokens/s':>9} {'vs HF generate':>15}")
    for r in rows:
        print(f"{r['engine']:<42} {r['ttft_ms']:>9.1f} {r['tokens_per_s']:>9.1f} {r['speedup_vs_hf_generate']:>14.2f}x")
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": "SmolLM2-135M-Instruct", "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "threads": threads}
        tmp_json = Path(out_json).with_suffix(".tmp")
        tmp_json.write_text(json.dumps({"workload": meta, "rows": rows}, ensure_ascii=False, indent=2), encoding="utf-8")
        os.replace(tmp_json, out_json)
    q8 = next(r for r in rows if r["engine"].startswith("llama.cpp Q8_0"))
    print(f"inference speedup (llama.cpp q8_0 vs HF generate): {q8['speedup_vs_hf_generate']:.2f}x")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infer.json"), help="results JSON")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: all cores)")
    args = parser.parse_args()
    run(args.out, args.threads)
