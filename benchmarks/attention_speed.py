"""Attention alone, forward + backward, interleaved in one process: the reference and blockwise tiles.

The model's heads (6 query, 2 KV, hd 32 for demo) at one batch and sequence length, in the compute dtype
the CPU policy picks (bf16 by default here). Each kernel is compiled once; then the kernels take turns,
`--rounds` rounds of `--calls` calls; the table shows the median and the fastest round. `--blockwise FILE`
adds the `blockwise_attention` of another copy of model/blockwise.py (e.g. `git show OLD:src/...`), so two
versions of the kernel are compared in the same minutes:

    python benchmarks/attention_speed.py --seq-len 256 --blocks 64,128 --blockwise /tmp/old_blockwise.py
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp

from anychip.config import MODEL_PRESETS
from anychip.model.attention import xla_attention
from anychip.model.blockwise import blockwise_attention


def _load(path: str):
    spec = importlib.util.spec_from_file_location(f"blockwise_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.blockwise_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="an anychip model preset (its heads)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--blocks", default="64,128", help="blockwise tiles, comma-separated")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--blockwise", action="append", default=[], metavar="FILE",
                        help="another model/blockwise.py to time beside this one")
    args = parser.parse_args()
    m = MODEL_PRESETS[args.model]
    B, T, dtype = args.batch_size, args.seq_len, jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, m.n_heads, m.head_dim), dtype)
    k, v = (jax.random.normal(kk, (B, T, m.n_kv_heads, m.head_dim), dtype) for kk in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)

    kernels = {"xla": xla_attention}
    for name, fn in [("blockwise", blockwise_attention)] + [(path, _load(path)) for path in args.blockwise]:
        for block in map(int, args.blocks.split(",")):
            kernels[f"{name} block {block}"] = functools.partial(fn, block=block)
    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

    grads = {name: jax.jit(jax.grad(functools.partial(loss, fn), (0, 1, 2))) for name, fn in kernels.items()}
    for grad in grads.values():
        jax.block_until_ready(grad(q, k, v))  # compile
    times = {name: [] for name in grads}
    for _ in range(args.rounds):
        for name, grad in grads.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                out = grad(q, k, v)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / args.calls)
    print(f"B {B}, T {T}, {m.n_heads}/{m.n_kv_heads} heads, hd {m.head_dim}, {dtype.name}: forward + backward")
    print(f"{'median ms':>10} {'best ms':>8}  kernel")
    for name, t in times.items():
        print(f"{statistics.median(t) * 1e3:10.2f} {min(t) * 1e3:8.2f}  {name}")


if __name__ == "__main__":
    main()
