"""Interleaved A/B of train-step variants in one process: which compute settings are faster here.

Each variant (a quoted list of anychip overrides) is built and compiled once, then the variants take
turns, `--rounds` rounds of `--steps` steps each, on the same random batch; the table shows each one's
median step time. In one process and interleaved, a machine that slows down mid-run slows every variant
alike, which separate processes (benchmarks/throughput.py) cannot promise; throughput.py is the one with
the transformers peer.

    python benchmarks/step_ab.py --model demo --batch-size 8 --seq-len 256 \\
        "" "compute.dtype=float32" "compute.attention_block=256 compute.loss_chunk=0"
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from shape_args import shape_parser

from anychip.config import load_config
from anychip.train.step import build_trainer


def main() -> None:
    parser = shape_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("variants", nargs="+", help='quoted overrides per variant; "" is the default')
    args = parser.parse_args()
    shape = [f"model={args.model}", f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}"]
    runs = []
    for variant in args.variants:
        cfg = load_config(None, shape + variant.split())
        trainer = build_trainer(cfg)
        state = trainer.init(jax.random.key(0))
        tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (args.batch_size, args.seq_len + 1))
        batch = jnp.asarray(tokens, jnp.int32)
        for _ in range(2):  # compile, then one step with donated buffers in place
            state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        runs.append({"name": variant or "(default)", "trainer": trainer, "state": state, "batch": batch, "s": []})
    for _ in range(args.rounds):
        for run in runs:
            start = time.perf_counter()
            for _ in range(args.steps):
                run["state"], metrics = run["trainer"].step(run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["s"].append((time.perf_counter() - start) / args.steps)
    tokens_per_step = args.batch_size * args.seq_len
    print(f"{'step ms':>8} {'tokens/s':>9}  variant (per-round ms)")
    for run in runs:
        step = statistics.median(run["s"])
        rounds = ", ".join(f"{s * 1e3:.0f}" for s in run["s"])
        print(f"{step * 1e3:8.1f} {tokens_per_step / step:9,.0f}  {run['name']}  ({rounds})")


if __name__ == "__main__":
    main()
