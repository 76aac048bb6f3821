"""Serving throughput and latency: `anychip serve` vs `transformers serve`, same model, same load, one run.

A random model of --model's shape is written as an anychip run and exported with `anychip export`; both
servers load that export's weights (anychip the run, transformers the export). A load generator of N
clients (N in --clients), each sending --requests completions one after another (a --prompt-tokens
prompt, --max-tokens greedy tokens, ignore_eos where the server knows it), measures per level:
tokens/s = completion tokens of all requests / wall time, and each request's latency p50 / p99.
`transformers serve` runs without and, where it works, with its --continuous-batching; it is started
with HF_HUB_OFFLINE=1 (nothing is downloaded). Each server gets one untimed warm-up request.
The transformers peers need its serving extra beside the test extra: `pip install fastapi accelerate`.

    python benchmarks/serve_bench.py                      # CPU: the demo model (3M), fp32
    python benchmarks/serve_bench.py --model 125m --clients 1,8,32 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax

from anychip.config import Config, replace
from anychip.data.tokenizer import train_tokenizer
from anychip.interop.hf import export_hf, write_run
from anychip.model.params import init_params


def make_model(preset: str, folder: Path) -> tuple[Path, Path, Any]:
    """(anychip run dir, its Hugging Face export, the tokenizer) of a random `preset` model with a BPE of its
    vocabulary."""
    cfg = replace(Config(), model=preset, run_dir=str(folder / "run"))
    texts = [" ".join(f"item {i * j % 997} of row {j} weighs {i + j} grams;" for j in range(60)) for i in range(400)]
    tokenizer = train_tokenizer(texts, cfg.model.vocab_size)
    write_run(cfg, init_params(cfg.model, jax.random.key(0)), tokenizer, source="serve_bench")
    return folder / "run", export_hf(folder / "run", folder / "hf"), tokenizer


class Server:
    """A server subprocess, ready once GET /health answers."""

    def __init__(self, name: str, cmd: list[str], url: str, env: dict[str, str] | None = None):
        self.name, self.url = name, url
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open as long as the server runs)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 600) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=5).read()
                return True
            except OSError:
                time.sleep(0.5)
        self.log.seek(0)
        print(f"{self.name} did not start:\n{self.log.read()[-3000:]}", file=sys.stderr)
        return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def complete(url: str, body: dict) -> tuple[float, int]:
    """(latency s, completion tokens) of one non-streamed completion."""
    request = urllib.request.Request(url + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t0, int(out["usage"]["completion_tokens"])


def load(url: str, body: dict, clients: int, requests: int) -> dict:
    """`clients` threads, each sending `requests` requests back to back: tokens/s and latency percentiles."""
    def client(_: int) -> list[tuple[float, int]]:
        return [complete(url, body) for _ in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    latencies = sorted(lat for lat, _ in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(n for _, n in results), "wall_s": wall,
            "tokens_per_s": sum(n for _, n in results) / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="an anychip model preset")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=32, help="anychip serve --slots")
    parser.add_argument("--peers", default="anychip,transformers,transformers-cb")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run, hf, tokenizer = make_model(args.model, Path(tmp))
        words = " ".join(f"item {i} of row {i % 7} weighs {i % 13} grams;" for i in range(args.prompt_tokens))
        prompt = tokenizer.decode(tokenizer.encode(words).ids[:args.prompt_tokens])  # text: transformers serve
        body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}  # takes no token ids
        servers = {
            "anychip": lambda port: Server("anychip", [sys.executable, "-m", "anychip.cli", "serve", str(run),
                                                       "--port", str(port), "--slots", str(args.slots),
                                                       "--model-name", "m"], f"http://127.0.0.1:{port}/v1"),
            "transformers": lambda port: Server("transformers", ["transformers", "serve", str(hf), "--port", str(port)],
                                                f"http://127.0.0.1:{port}/v1", {"HF_HUB_OFFLINE": "1"}),
            "transformers-cb": lambda port: Server("transformers-cb", ["transformers", "serve", str(hf), "--port",
                                                                       str(port), "--continuous-batching"],
                                                   f"http://127.0.0.1:{port}/v1", {"HF_HUB_OFFLINE": "1"}),
        }
        for port, name in enumerate(args.peers.split(","), start=18431):
            server = servers[name](port)
            try:
                if not server.wait_ready():
                    continue
                request = {**body, "model": "m" if name == "anychip" else str(hf),
                           **({"ignore_eos": True} if name == "anychip" else {})}
                complete(server.url, request)  # warm-up: compilation, model load
                for clients in levels:
                    row = {"server": name, **load(server.url, request, clients, args.requests)}
                    rows.append(row)
                    print(f"{name:16s} {clients:3d} clients  {row['tokens_per_s']:9.1f} tok/s  p50 {row['p50_s']:7.3f}s"
                          f"  p99 {row['p99_s']:7.3f}s  ({row['requests']} requests, {row['tokens']} tokens)", flush=True)
            finally:
                server.stop()
    print(f"\n{args.model}, prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens, greedy, "
          f"{args.requests} requests per client, anychip --slots {args.slots}")
    print("| server | clients | tokens/s | p50 latency s | p99 latency s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
