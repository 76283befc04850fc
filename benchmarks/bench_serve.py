"""API server throughput under concurrency: 1, 4 and 8 streaming clients against ``chinese-vicuna serve``.

Workload: the embedded SmolLM2-135M-Instruct, served by a real server process (continuous batching,
``--max-concurrency 8``), and for reference the same server with ``--max-concurrency 1`` (one request
generates at a time, the others queue). Each client sends ``--requests`` streamed chat completions,
one after another, of exactly ``--tokens`` tokens (``min_tokens`` = ``max_tokens``, greedy); the
server runs ``--threads`` torch threads.
Reported per run: aggregate generated tokens/s over all clients, and time to first token (median
and worst) measured by the clients.

Prints a table, writes benchmarks/results/serve.json and ends with
``serve speedup (8 clients vs 1, batched): N.NNx``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["天空为什么是蓝色的？", "写一首关于秋天的诗。", "介绍一下长城。", "如何学习编程？",
           "解释一下光合作用。", "推荐几本好书。", "今天晚饭吃什么？", "What is machine learning?"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(concurrency: int, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "chinese_vicuna", "serve", "--port", str(port), "--max-concurrency", str(concurrency)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 300 s")


async def run_clients(url: str, clients: int, requests: int, tokens: int) -> dict:
    import httpx

    model = (await asyncio.to_thread(httpx.get, url + "/v1/models")).json()["data"][0]["id"]
    ttfts: list[float] = []
    generated = 0

    async def client(c: int, http) -> None:
        nonlocal generated
        for r in range(requests):
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[(c + r) % len(PROMPTS)]}],
                    "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            start, first = time.perf_counter(), None
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and any(ch["delta"].get("content") for ch in chunk.get("choices", [])):
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        generated += chunk["usage"]["completion_tokens"]
            ttfts.append(first if first is not None else time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await client(0, http)  # warm-up (not counted)
        ttfts.clear()
        generated = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, "tokens_per_s": generated / elapsed, "tokens": generated, "seconds": elapsed,
            "ttft_median_s": statistics.median(ttfts), "ttft_max_s": max(ttfts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1, help="requests per client")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the server (1: stable on a CPU shared with other jobs)")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    results = {}
    for label, concurrency in (("batched", max(counts)), ("one at a time", 1)):
        proc, url = start_server(concurrency, args.threads)
        try:
            runs = counts if label == "batched" else [max(counts)]
            results[label] = [asyncio.run(run_clients(url, n, args.requests, args.tokens)) for n in runs]
        finally:
            proc.terminate()
            proc.wait(30)

    print(f"{'server':<15} {'clients':>7} {'tokens/s':>9} {'TTFT median':>12} {'TTFT max':>9}")
    for label, runs in results.items():
        for r in runs:
            print(f"{label:<15} {r['clients']:>7} {r['tokens_per_s']:>9.1f} {r['ttft_median_s']:>11.2f}s "
                  f"{r['ttft_max_s']:>8.2f}s")
    batched = {r["clients"]: r for r in results["batched"]}
    speedup = batched[max(counts)]["tokens_per_s"] / batched[min(counts)]["tokens_per_s"]
    vs_serial = batched[max(counts)]["tokens_per_s"] / results["one at a time"][0]["tokens_per_s"]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"workload": vars(args), "results": results, "speedup_8_vs_1": speedup,
                               "batched_vs_serial_at_8": vs_serial}, indent=2), encoding="utf-8")
    os.replace(tmp, out)
    print(f"{max(counts)} clients, batched vs one-at-a-time server: {vs_serial:.2f}x")
    print(f"serve speedup ({max(counts)} clients vs {min(counts)}, batched): {speedup:.2f}x")


if __name__ == "__main__":
    main()
