"""Input pipeline throughput, each number against its peer measured in the same invocation, interleaved.

1. Preparation tokens/s: `prepare(engine="local")` and `prepare(engine="ray")` (a local Ray cluster on
   the same cores, started and its workers warmed by one small untimed preparation before the rounds) against raw `tokenizers` `encode_batch_fast` of the
   same documents already in memory (the practical limit). Target: >= 0.8x.
2. Training tokens/s reading the data from moto's S3 server on loopback (streamed, data/stream.py)
   against the same data on local disk. Target: >= 0.95x.

    PYTHONPATH=src python benchmarks/data_bench.py [--rounds 3] [--prep-files 120] [--train-steps 40]

Prints one JSON object: per round the raw numbers, the medians of the ratios, the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np

from anychip.data import prepare as preparing
from anychip.data.prepare import prepare, stdlib_sources
from anychip.data.sources import read_documents
from anychip.data.tokenizer import load_tokenizer


def prep_round(files: list[str], tokenizer: str, tmp: Path, n: int, ray_ready: bool) -> dict[str, float]:
    docs = list(read_documents(files, Counter()))
    tok = load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    tokens = sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs))  # +1: the EOT prepare appends
    out = {"raw_tokens_per_s": tokens / (time.perf_counter() - t0)}
    for engine in ("local", "ray") if ray_ready else ("local",):
        t0 = time.perf_counter()
        manifest = prepare(files, tmp / f"{engine}-{n}", tokenizer=tokenizer, engine=engine, log=lambda _: None)
        assert manifest["total_tokens"] == tokens
        out[f"{engine}_tokens_per_s"] = tokens / (time.perf_counter() - t0)
    return out


def train_tokens_per_s(data: str, run_dir: str, steps: int) -> float:
    from anychip.config import load_config
    from anychip.train.loop import train
    from anychip.train.run_dir import RunDir

    cfg = load_config(None, ["model=tiny", "model.vocab_size=8192", "train.batch_size=8", "train.seq_len=256",
                             f"train.steps={steps}", "log.every=1", "eval.every=1000", "eval.batches=1",
                             "eval.sample_tokens=0", "checkpoint.every_steps=0", f"data.path={data}",
                             f"run_dir={run_dir}"])
    train(cfg, log=lambda _: None)
    rates = [r["tokens_per_s"] for r in RunDir(run_dir).read_metrics() if "tokens_per_s" in r]
    return float(np.median(rates[len(rates) // 4:]))  # past compilation and warm-up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prep-files", type=int, default=120)
    parser.add_argument("--train-steps", type=int, default=40, help="0: preparation only")
    args = parser.parse_args()
    import ray
    from s3_server import make_bucket, moto_s3, upload

    preparing.TASK_BYTES = 1 << 20  # several tasks, so the Ray engine has work to spread
    tmp = Path(tempfile.mkdtemp(prefix="data-bench-"))
    files = [str(p) for p in stdlib_sources(sysconfig.get_paths()["stdlib"])][: args.prep_files]
    prepare(files, tmp / "tok", vocab_size=8192, log=lambda _: None)
    tokenizer = str(tmp / "tok" / "tokenizer.json")
    result: dict = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count(), "prep": [], "train": []}
    with moto_s3():
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        result["ray_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()  # untimed warm-up: Ray starts the preparation's workers on their first tasks
        prepare(files, tmp / "warm-up", tokenizer=tokenizer, engine="ray", log=lambda _: None)
        result["ray_workers_start_s"] = time.perf_counter() - t0
        for n in range(args.rounds):
            result["prep"].append(prep_round(files, tokenizer, tmp, n, True))
        ray.shutdown()
        bucket = make_bucket("bench")
        upload(tmp / "tok", f"{bucket}/data")
        for n in range(args.rounds if args.train_steps else 0):  # interleaved: local disk, then the S3 server
            local = train_tokens_per_s(str(tmp / "tok"), str(tmp / f"run-local-{n}"), args.train_steps)
            remote = train_tokens_per_s(f"{bucket}/data", str(tmp / f"run-s3-{n}"), args.train_steps)
            result["train"].append({"local_disk_tokens_per_s": local, "s3_tokens_per_s": remote})
    prep, trains = result["prep"], result["train"]
    result["ratios"] = {
        "local_engine_vs_raw": float(np.median([r["local_tokens_per_s"] / r["raw_tokens_per_s"] for r in prep])),
        "ray_engine_vs_raw": float(np.median([r["ray_tokens_per_s"] / r["raw_tokens_per_s"] for r in prep])),
    }
    if trains:
        result["ratios"]["train_s3_vs_local"] = float(np.median([r["s3_tokens_per_s"] / r["local_disk_tokens_per_s"]
                                                                 for r in trains]))
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
