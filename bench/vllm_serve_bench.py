"""Serving benchmark: `tokenreduce serve` unreduced vs. VisionZip keep=64, time to first token and
requests per second at concurrency 1, 8 and 32 (the real OpenAI client, streaming).

    .venv-vllm/bin/python bench/vllm_serve_bench.py [--quick] [--json out.json]

The model: a random LLaVA-1.5 with a ~150M-parameter Llama (hidden 768, 12 layers, vocab 32k),
bf16, CLIP 336/14 (576 image tokens), saved by `tokenreduce.testing.tiny_vlm.save_llava`. Each
request carries its own random image (no encoder / processor / prefix cache hit; prefix caching
is off too) and asks for 8 tokens. On the CPU, only the ratios mean something.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List


from tokenreduce.vllm.client import free_port, image_data_url, wait_healthy

CONCURRENCY = (1, 8, 32)
CONFIGS = {"unreduced": [], "visionzip keep=64": ["--method", "visionzip", "--keep", "64"]}
NEW_TOKENS = 8


def data_url(seed: int) -> str:
    return image_data_url(seed, (336, 336))


def start_server(model: str, port: int, extra: List[str], log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tokenreduce", "serve", model, "--port", str(port), *extra,
           "--dtype", "bfloat16", "--max-model-len", "2048", "--no-enable-prefix-caching",
           "--max-num-seqs", "64", "--limit-mm-per-prompt", '{"image": 1}', "--distributed-executor-backend", "uni"]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 600) -> None:
    wait_healthy(proc, port, timeout)


async def one_request(client, model: str, seed: int) -> Dict[str, float]:
    t0 = time.perf_counter()
    ttft = None
    stream = await client.chat.completions.create(
        model=model, max_tokens=NEW_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "min_tokens": NEW_TOKENS},
        messages=[{"role": "user", "content": [{"type": "text", "text": "describe the image"},
                                               {"type": "image_url", "image_url": {"url": data_url(seed)}}]}])
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "latency": time.perf_counter() - t0}


async def run_level(port: int, model: str, concurrency: int, n: int, seed0: int) -> Dict[str, float]:
    import openai
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=1800)
    sem = asyncio.Semaphore(concurrency)

    async def bounded(i):
        async with sem:
            return await one_request(client, model, seed0 + i)
    t0 = time.perf_counter()
    res = await asyncio.gather(*(bounded(i) for i in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"concurrency": concurrency, "requests": n, "ttft_median_s": statistics.median(r["ttft"] for r in res),
            "requests_per_s": n / wall, "wall_s": wall}


def bench_config(model: str, label: str, extra: List[str], reps: int, workdir: str) -> List[Dict[str, float]]:
    port = free_port()
    proc = start_server(model, port, extra, os.path.join(workdir, f"server-{label.split()[0]}.log"))
    try:
        wait_ready(proc, port)
        asyncio.run(run_level(port, model, 2, 2, 10_000))          # warm-up
        rows = []
        for c in CONCURRENCY:
            row = asyncio.run(run_level(port, model, c, max(2, c * reps), 1000 * c))
            row["config"] = label
            rows.append(row)
            print(f"  {label:20s} c={c:3d}  TTFT {row['ttft_median_s']:.3f} s  {row['requests_per_s']:.2f} req/s",
                  flush=True)
        return rows
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one request per concurrency slot (default two)")
    ap.add_argument("--json", help="write the rows and ratios as JSON")
    ap.add_argument("--model", help="an already saved model folder (default: build the ~150M one)")
    args = ap.parse_args(argv)
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")   # GiB; 32 x ~600 tokens need ~0.7 GiB here
    workdir = tempfile.mkdtemp(prefix="tokenreduce-vllm-bench-")
    model = args.model
    if model is None:
        import torch
        from tokenreduce.testing.tiny_vlm import save_llava
        model = save_llava(os.path.join(workdir, "llava-150m"), size="bench", dtype=torch.bfloat16)
    reps = 1 if args.quick else 2
    rows = []
    for label, extra in CONFIGS.items():
        rows += bench_config(model, label, extra, reps, workdir)
    base = {r["concurrency"]: r for r in rows if r["config"] == "unreduced"}
    ratios = []
    print("\nconcurrency | TTFT unreduced / visionzip | req/s visionzip / unreduced")
    for r in rows:
        if r["config"] == "unreduced":
            continue
        b = base[r["concurrency"]]
        ratio = {"concurrency": r["concurrency"], "ttft_speedup": b["ttft_median_s"] / r["ttft_median_s"],
                 "throughput_ratio": r["requests_per_s"] / b["requests_per_s"]}
        ratios.append(ratio)
        print(f"{r['concurrency']:11d} | {ratio['ttft_speedup']:26.2f} | {ratio['throughput_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratios": ratios, "model": "llava-1.5 random, Llama ~150M bf16, 576 image tokens",
                       "new_tokens": NEW_TOKENS}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
